//! Presence members of one channel: one member per user id however many connections that user
//! has, so `member_added` fires on the first connection and `member_removed` on the last.
//!
//! In a cluster the channel also knows the members other nodes announced (`remote`, with the
//! nodes each is connected to): a user is new to the channel when neither this node nor any
//! other had them, and gone when the last node lets them go.

use std::collections::HashMap;

use serde_json::Value;

#[derive(Default)]
pub struct Presence {
    members: HashMap<String, Member>,
    remote: HashMap<String, Remote>,
}

struct Member {
    info: Value,
    connections: u32,
}

struct Remote {
    info: Value,
    nodes: Vec<String>,
}

impl Presence {
    /// Members on every node (a user counts once).
    pub fn len(&self) -> usize {
        self.members.len() + self.remote.keys().filter(|u| !self.members.contains_key(*u)).count()
    }

    /// No member on any node.
    pub fn is_empty(&self) -> bool {
        self.members.is_empty() && self.remote.is_empty()
    }

    /// Whether `user_id` is a member on any node.
    pub fn contains(&self, user_id: &str) -> bool {
        self.members.contains_key(user_id) || self.remote.contains_key(user_id)
    }

    /// Whether another node has `user_id` as a member.
    pub fn elsewhere(&self, user_id: &str) -> bool {
        self.remote.contains_key(user_id)
    }

    /// Adds one connection of `user_id` on this node; true when the user is new to this node.
    pub fn add(&mut self, user_id: &str, info: Value) -> bool {
        match self.members.get_mut(user_id) {
            Some(m) => {
                m.connections += 1;
                false
            }
            None => {
                self.members.insert(user_id.to_string(), Member { info, connections: 1 });
                true
            }
        }
    }

    /// Removes one connection of `user_id`; true when that was the user's last on this node.
    pub fn remove(&mut self, user_id: &str) -> bool {
        let Some(m) = self.members.get_mut(user_id) else { return false };
        m.connections = m.connections.saturating_sub(1);
        if m.connections == 0 {
            self.members.remove(user_id);
            true
        } else {
            false
        }
    }

    /// Records that `node` has `user_id` as a member; true when the user is new to the channel.
    pub fn add_remote(&mut self, user_id: &str, info: Value, node: &str) -> bool {
        let new = !self.contains(user_id);
        let remote = self.remote.entry(user_id.to_string()).or_insert_with(|| Remote { info, nodes: Vec::new() });
        if !remote.nodes.iter().any(|n| n == node) {
            remote.nodes.push(node.to_string());
        }
        new
    }

    /// Records that `node` no longer has `user_id`; true when the user has left the channel.
    pub fn remove_remote(&mut self, user_id: &str, node: &str) -> bool {
        let Some(remote) = self.remote.get_mut(user_id) else { return false };
        remote.nodes.retain(|n| n != node);
        if !remote.nodes.is_empty() {
            return false;
        }
        self.remote.remove(user_id);
        !self.members.contains_key(user_id)
    }

    /// Forgets every member of `node` (gone from the cluster); returns the users who left.
    pub fn forget_node(&mut self, node: &str) -> Vec<String> {
        let users: Vec<String> = self.remote.iter().filter(|(_, r)| r.nodes.iter().any(|n| n == node)).map(|(u, _)| u.clone()).collect();
        users.into_iter().filter(|u| self.remove_remote(u, node)).collect()
    }

    /// This node's members.
    pub fn ids(&self) -> impl Iterator<Item = &String> {
        self.members.keys()
    }

    /// This node's members with their info.
    pub fn local(&self) -> impl Iterator<Item = (&String, &Value)> {
        self.members.iter().map(|(id, m)| (id, &m.info))
    }

    /// `{"presence":{"ids":[..],"hash":{id: info},"count":n}}` for `subscription_succeeded`:
    /// the members on every node.
    pub fn snapshot(&self) -> Value {
        let remote_only = self.remote.iter().filter(|(u, _)| !self.members.contains_key(*u)).map(|(u, r)| (u, &r.info));
        let all: Vec<(&String, &Value)> = self.local().chain(remote_only).collect();
        let ids: Vec<&String> = all.iter().map(|(id, _)| *id).collect();
        let hash: serde_json::Map<String, Value> = all.iter().map(|(id, info)| ((*id).clone(), (*info).clone())).collect();
        serde_json::json!({ "presence": { "ids": ids, "hash": hash, "count": all.len() } })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_member_per_user() {
        let mut p = Presence::default();
        assert!(p.add("u1", Value::Null));
        assert!(!p.add("u1", Value::Null));
        assert!(p.add("u2", serde_json::json!({"name": "b"})));
        assert_eq!(p.snapshot()["presence"]["count"], 2);
        assert!(!p.remove("u1"));
        assert!(p.remove("u1"));
        assert!(!p.remove("u1"));
        assert_eq!(p.len(), 1);
    }

    #[test]
    fn a_user_on_several_nodes_joins_once_and_leaves_with_the_last() {
        let mut p = Presence::default();
        assert!(p.add_remote("u1", Value::Null, "a"), "new to the channel");
        assert!(!p.add_remote("u1", Value::Null, "b"), "already there, through node a");
        assert!(p.add("u1", Value::Null), "new to this node");
        assert!(p.elsewhere("u1"));
        assert_eq!(p.len(), 1);
        assert!(!p.remove_remote("u1", "a"));
        assert!(p.remove("u1"));
        assert!(p.elsewhere("u1"), "still on node b");
        assert!(p.add_remote("u2", serde_json::json!({"n": 2}), "b"));
        assert_eq!(p.snapshot()["presence"]["count"], 2);
        assert_eq!(p.snapshot()["presence"]["hash"]["u2"], serde_json::json!({"n": 2}));
        let mut gone = p.forget_node("b");
        gone.sort();
        assert_eq!(gone, ["u1", "u2"]);
        assert!(p.is_empty());
    }
}
