//! Signed-in users and their watchlists (`pusher_internal:watchlist_events`, pusher-js's
//! `pusher.user.watchlist`): a user is online while any node has a connection signed in as them.
//! A connection whose sign-in listed user ids in `user_data.watchlist` hears which of them are
//! online right after signing in, then `online` when one of them signs in anywhere with no
//! connection before, and `offline` when their last connection anywhere ends.
//!
//! In a cluster each node tells the others when a user's first connection on it signs in and when
//! the last one ends (`remote`), and forgets a node's users when the node leaves.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::ws::Utf8Bytes;
use serde_json::{json, Value};

use super::connection::Conn;
use super::protocol;

/// User ids one sign-in may watch (Pusher's limit).
pub const MAX_WATCHLIST: usize = 100;

#[derive(Default)]
pub struct Users {
    /// This node's connections signed in as each user.
    conns: HashMap<String, Vec<Arc<Conn>>>,
    /// Users signed in on other nodes, with those nodes.
    remote: HashMap<String, Vec<String>>,
    /// The connections watching each user id.
    watchers: HashMap<String, Vec<Arc<Conn>>>,
    /// What each watching connection watches (kept here, not with every connection: most have
    /// no watchlist).
    watching: HashMap<u64, Vec<String>>,
}

/// What a sign-in changed.
pub struct SignedIn {
    /// The user's first connection on this node (the cluster hears of it).
    pub first_here: bool,
    /// The user had no connection on any node (their watchers hear `online`).
    pub came_online: bool,
    /// The watched users online now.
    pub watched_online: Vec<String>,
}

/// What the end of a signed-in connection changed.
pub struct SignedOut {
    /// It was the user's last connection on this node.
    pub last_here: bool,
    /// The user has no connection left on any node.
    pub went_offline: bool,
}

impl Users {
    pub fn is_online(&self, user_id: &str) -> bool {
        self.conns.contains_key(user_id) || self.remote.contains_key(user_id)
    }

    /// Signs `conn` in as `user_id`, watching `watchlist`.
    pub fn sign_in(&mut self, conn: &Arc<Conn>, user_id: &str, watchlist: Vec<String>) -> SignedIn {
        let came_online = !self.is_online(user_id);
        let mine = self.conns.entry(user_id.to_string()).or_default();
        let first_here = mine.is_empty();
        mine.push(conn.clone());
        for watched in &watchlist {
            self.watchers.entry(watched.clone()).or_default().push(conn.clone());
        }
        let watched_online = watchlist.iter().filter(|w| self.is_online(w)).cloned().collect();
        if !watchlist.is_empty() {
            self.watching.insert(conn.id, watchlist);
        }
        SignedIn { first_here, came_online, watched_online }
    }

    /// Forgets `conn`, signed in as `user_id`, and what it watched.
    pub fn sign_out(&mut self, conn: &Conn, user_id: &str) -> SignedOut {
        for watched in self.watching.remove(&conn.id).unwrap_or_default() {
            remove_conn(&mut self.watchers, &watched, conn.id);
        }
        let last_here = remove_conn(&mut self.conns, user_id, conn.id);
        SignedOut { last_here, went_offline: last_here && !self.remote.contains_key(user_id) }
    }

    /// `node` has (`online`) or no longer has a connection signed in as `user_id`:
    /// `Some(online)` when that made the user come online or go offline.
    pub fn remote(&mut self, user_id: &str, online: bool, node: &str) -> Option<bool> {
        let was = self.is_online(user_id);
        if online {
            let nodes = self.remote.entry(user_id.to_string()).or_default();
            if !nodes.iter().any(|n| n == node) {
                nodes.push(node.to_string());
            }
        } else if let Some(nodes) = self.remote.get_mut(user_id) {
            nodes.retain(|n| n != node);
            if nodes.is_empty() {
                self.remote.remove(user_id);
            }
        }
        let now = self.is_online(user_id);
        (was != now).then_some(now)
    }

    /// Forgets the users of `node` (gone from the cluster); returns those now offline.
    pub fn forget_node(&mut self, node: &str) -> Vec<String> {
        let users: Vec<String> = self.remote.iter().filter(|(_, nodes)| nodes.iter().any(|n| n == node)).map(|(u, _)| u.clone()).collect();
        users.into_iter().filter(|u| self.remote(u, false, node) == Some(false)).collect()
    }

    /// This node's connections signed in as `user_id`.
    pub fn connections(&self, user_id: &str) -> Vec<Arc<Conn>> {
        self.conns.get(user_id).cloned().unwrap_or_default()
    }

    /// Users signed in on this node, and connections watching someone.
    pub fn sizes(&self) -> (usize, usize) {
        (self.conns.len(), self.watching.len())
    }

    /// The users signed in on this node.
    pub fn local(&self) -> Vec<String> {
        self.conns.keys().cloned().collect()
    }

    /// Tells the connections watching `user_id` that they came `online` or went offline.
    pub fn tell_watchers(&self, user_id: &str, online: bool) {
        if let Some(watchers) = self.watchers.get(user_id) {
            let frame = frame(online, &[user_id]);
            for w in watchers {
                w.send(&frame);
            }
        }
    }
}

/// Removes connection `id` from `map[key]`; true when that emptied it.
fn remove_conn(map: &mut HashMap<String, Vec<Arc<Conn>>>, key: &str, id: u64) -> bool {
    let Some(list) = map.get_mut(key) else { return false };
    let before = list.len();
    list.retain(|c| c.id != id);
    if list.is_empty() {
        map.remove(key);
        return before > 0;
    }
    false
}

/// `pusher_internal:watchlist_events` with one event.
pub fn frame(online: bool, user_ids: &[impl AsRef<str>]) -> Utf8Bytes {
    let ids: Vec<&str> = user_ids.iter().map(AsRef::as_ref).collect();
    let name = if online { "online" } else { "offline" };
    protocol::json_string_event("pusher_internal:watchlist_events", None, &json!({ "events": [{ "name": name, "user_ids": ids }] }))
}

/// The user ids in `user_data.watchlist` (strings, or numbers as their text); none without one.
pub fn parse(user_data: &Value) -> Result<Vec<String>, String> {
    let Some(list) = user_data.get("watchlist") else { return Ok(Vec::new()) };
    let invalid = || format!("user_data.watchlist must be an array of at most {MAX_WATCHLIST} user ids");
    let items = list.as_array().filter(|a| a.len() <= MAX_WATCHLIST).ok_or_else(invalid)?;
    let mut ids: Vec<String> = items
        .iter()
        .map(|v| match v {
            Value::String(s) if !s.is_empty() && s.len() <= 200 => Some(s.clone()),
            Value::Number(n) => Some(n.to_string()),
            _ => None,
        })
        .collect::<Option<_>>()
        .ok_or_else(invalid)?;
    ids.sort_unstable();
    ids.dedup();
    Ok(ids)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn(id: u64) -> Arc<Conn> {
        Arc::new(Conn::new(id, format!("1.{id}"), 16, metrics::Counter::noop()))
    }

    #[test]
    fn online_while_any_node_has_the_user() {
        let mut users = Users::default();
        let (a1, a2) = (conn(1), conn(2));
        let first = users.sign_in(&a1, "ann", Vec::new());
        assert!(first.first_here && first.came_online);
        let second = users.sign_in(&a2, "ann", Vec::new());
        assert!(!second.first_here && !second.came_online);
        assert_eq!(users.remote("ann", true, "n2"), None, "already online here");
        let out = users.sign_out(&a1, "ann");
        assert!(!out.last_here && !out.went_offline);
        let out = users.sign_out(&a2, "ann");
        assert!(out.last_here && !out.went_offline, "still signed in on n2");
        assert_eq!(users.forget_node("n2"), ["ann"]);
        assert!(!users.is_online("ann"));
        assert_eq!(users.remote("bob", true, "n3"), Some(true));
        assert_eq!(users.remote("bob", true, "n4"), None);
        assert_eq!(users.remote("bob", false, "n3"), None);
        assert_eq!(users.remote("bob", false, "n4"), Some(false));
    }

    #[test]
    fn a_sign_in_learns_who_it_watches_is_online_and_stops_watching_when_it_ends() {
        let mut users = Users::default();
        let (bob, ann) = (conn(1), conn(2));
        users.sign_in(&bob, "bob", Vec::new());
        assert!(users.watching.is_empty(), "nothing kept for a connection that watches nobody");
        users.remote("cid", true, "n2");
        let watchlist = vec!["bob".to_string(), "cid".to_string(), "dan".to_string()];
        let signed = users.sign_in(&ann, "ann", watchlist);
        assert_eq!(signed.watched_online, ["bob", "cid"]);
        assert_eq!(users.watchers.get("dan").map(Vec::len), Some(1));
        users.sign_out(&ann, "ann");
        assert!(users.watchers.is_empty() && users.watching.is_empty(), "no watcher outlives its connection");
    }

    #[test]
    fn watchlists_are_validated() {
        assert_eq!(parse(&json!({"id": "a"})).unwrap(), Vec::<String>::new());
        assert_eq!(parse(&json!({"watchlist": ["b", 7, "b"]})).unwrap(), ["7", "b"]);
        assert!(parse(&json!({"watchlist": "b"})).is_err());
        assert!(parse(&json!({"watchlist": [""]})).is_err());
        assert!(parse(&json!({"watchlist": [{"id": 1}]})).is_err());
        let too_many: Vec<String> = (0..=MAX_WATCHLIST).map(|i| i.to_string()).collect();
        assert!(parse(&json!({ "watchlist": too_many })).is_err());
    }
}
