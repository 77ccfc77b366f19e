//! Presence members of one channel: one member per user id however many connections that user
//! has, so `member_added` fires on the first connection and `member_removed` on the last.

use std::collections::HashMap;

use serde_json::Value;

#[derive(Default)]
pub struct Presence {
    members: HashMap<String, Member>,
}

struct Member {
    info: Value,
    connections: u32,
}

impl Presence {
    pub fn len(&self) -> usize {
        self.members.len()
    }

    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    pub fn contains(&self, user_id: &str) -> bool {
        self.members.contains_key(user_id)
    }

    /// Adds one connection of `user_id`; true when the user is new to the channel.
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

    /// Removes one connection of `user_id`; true when that was the user's last.
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

    pub fn ids(&self) -> impl Iterator<Item = &String> {
        self.members.keys()
    }

    /// `{"presence":{"ids":[..],"hash":{id: info},"count":n}}` for `subscription_succeeded`.
    pub fn snapshot(&self) -> Value {
        let ids: Vec<&String> = self.members.keys().collect();
        let hash: serde_json::Map<String, Value> =
            self.members.iter().map(|(id, m)| (id.clone(), m.info.clone())).collect();
        serde_json::json!({ "presence": { "ids": ids, "hash": hash, "count": self.members.len() } })
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
}
