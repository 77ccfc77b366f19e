//! Subscription counts for apps with `subscription_count` on: the subscribers of a public or
//! private channel hear how many connections are subscribed to it, across the cluster
//! (`pusher_internal:subscription_count`, pusher-js's `pusher:subscription_count`), whenever that
//! number changes. A channel tells at most once per [`INTERVAL`]; changes within it are told
//! together at its end (the tenant keeps the channels due), so a thousand clients joining at
//! once cost each subscriber a handful of events, not a thousand. A new subscriber is told the
//! count right after `subscription_succeeded`.
//!
//! In a cluster each node announces its own count for a channel at the same pace, and keeps the
//! other nodes' ([`Remote`]).

use std::collections::HashMap;
use std::time::Duration;

use axum::extract::ws::Utf8Bytes;
use serde_json::json;
use tokio::time::Instant;

use super::protocol::{self, ChannelKind, ChannelType};

/// The shortest time between two counts told about one channel.
pub const INTERVAL: Duration = Duration::from_secs(1);

/// Whether a channel of type `ty` has counts told: not presence channels (their members are
/// told instead, as on Pusher) nor a user's own `#server-to-user-` channel.
pub fn counted(ty: &ChannelType) -> bool {
    matches!(ty.kind, ChannelKind::Public | ChannelKind::Private | ChannelKind::PrivateEncrypted)
}

/// What one channel has told about its count.
#[derive(Default)]
pub struct Told {
    at: Option<Instant>,
    /// The total last sent to this node's subscribers; `None` since it last had none.
    total: Option<usize>,
    /// This node's count as last announced to the cluster.
    announced: usize,
    /// A subscription here changed since the last webhook.
    local_change: bool,
    hooked: Option<usize>,
}

/// What to tell about a channel's count now.
#[derive(Debug, PartialEq, Eq, Default)]
pub struct Telling {
    /// This node's count, for the cluster.
    pub announce: Option<usize>,
    /// The total, for this node's subscribers.
    pub send: Option<usize>,
    /// The total, for the `subscription_count` webhook.
    pub webhook: Option<usize>,
}

impl Told {
    /// Marks a subscription made or ended on this node (the webhook follows those).
    pub fn local_change(&mut self) {
        self.local_change = true;
    }

    /// Whether a change now has to wait for the end of the interval.
    pub fn recently(&self, now: Instant) -> bool {
        self.at.is_some_and(|at| now.saturating_duration_since(at) < INTERVAL)
    }

    /// When a change waiting since a tell at `at` is due.
    pub fn due_at(&self) -> Option<Instant> {
        self.at.map(|at| at + INTERVAL)
    }

    /// Tells the count: `local` subscribers here, `remote` on other nodes.
    pub fn tell(&mut self, local: usize, remote: usize, now: Instant) -> Telling {
        self.at = Some(now);
        let total = local + remote;
        let announce = (self.announced != local).then(|| {
            self.announced = local;
            local
        });
        let send = if local == 0 {
            self.total = None;
            None
        } else {
            (self.total != Some(total)).then(|| {
                self.total = Some(total);
                total
            })
        };
        let webhook = (std::mem::take(&mut self.local_change) && self.hooked != Some(total)).then(|| {
            self.hooked = Some(total);
            total
        });
        Telling { announce, send, webhook }
    }
}

/// Other nodes' subscriber counts, per channel.
#[derive(Default)]
pub struct Remote(HashMap<String, Vec<(String, usize)>>);

impl Remote {
    pub fn total(&self, channel: &str) -> usize {
        self.0.get(channel).map_or(0, |nodes| nodes.iter().map(|(_, n)| n).sum())
    }

    /// Records `node`'s count for `channel`, unless that would make it remember more than
    /// `max_channels` channels; true when the total changed.
    pub fn set(&mut self, channel: &str, node: &str, count: usize, max_channels: usize) -> bool {
        let before = self.total(channel);
        let room = self.0.len() < max_channels;
        match self.0.get_mut(channel) {
            Some(nodes) => {
                nodes.retain(|(n, _)| n != node);
                if count > 0 {
                    nodes.push((node.to_string(), count));
                } else if nodes.is_empty() {
                    self.0.remove(channel);
                }
            }
            None if count > 0 && room => {
                self.0.insert(channel.to_string(), vec![(node.to_string(), count)]);
            }
            None => {}
        }
        self.total(channel) != before
    }

    /// Forgets `node` (gone from the cluster); returns the channels whose total changed.
    pub fn forget_node(&mut self, node: &str) -> Vec<String> {
        let channels: Vec<String> = self.0.iter().filter(|(_, nodes)| nodes.iter().any(|(n, _)| n == node)).map(|(c, _)| c.clone()).collect();
        for c in &channels {
            self.set(c, node, 0, usize::MAX);
        }
        channels
    }
}

/// `pusher_internal:subscription_count` for `channel`.
pub fn frame(channel: &str, total: usize) -> Utf8Bytes {
    protocol::json_string_event("pusher_internal:subscription_count", Some(channel), &json!({ "subscription_count": total }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_count_is_told_once_per_change_and_the_cluster_hears_only_this_node_s_share() {
        let now = Instant::now();
        let mut told = Told::default();
        told.local_change();
        assert_eq!(told.tell(1, 0, now), Telling { announce: Some(1), send: Some(1), webhook: Some(1) });
        assert!(told.recently(now + INTERVAL / 2) && !told.recently(now + INTERVAL));
        assert_eq!(told.due_at(), Some(now + INTERVAL));
        assert_eq!(told.tell(1, 2, now), Telling { announce: None, send: Some(3), webhook: None }, "a remote change: no webhook here");
        assert_eq!(told.tell(1, 2, now), Telling::default(), "nothing changed");
        told.local_change();
        assert_eq!(told.tell(0, 2, now), Telling { announce: Some(0), send: None, webhook: Some(2) }, "nobody here to tell");
        assert_eq!(told.tell(1, 2, now).send, Some(3), "a subscriber arriving again is told");
    }

    #[test]
    fn remote_counts_add_up_per_channel_and_leave_with_their_node() {
        let mut remote = Remote::default();
        assert!(remote.set("c", "n1", 2, 10));
        assert!(remote.set("c", "n2", 3, 10));
        assert!(!remote.set("c", "n2", 3, 10));
        assert_eq!(remote.total("c"), 5);
        assert!(!remote.set("d", "n1", 1, 1), "bounded: a second channel is not remembered");
        assert_eq!(remote.forget_node("n1"), ["c"]);
        assert_eq!(remote.total("c"), 3);
        assert!(remote.set("c", "n2", 0, 10));
        assert!(remote.0.is_empty());
    }

    #[test]
    fn presence_and_user_channels_are_not_counted() {
        let ty = |n: &str| ChannelType::parse(n).unwrap();
        assert!(counted(&ty("news")) && counted(&ty("private-x")) && counted(&ty("private-encrypted-x")) && counted(&ty("cache-x")));
        assert!(!counted(&ty("presence-x")) && !counted(&ty("#server-to-user-u")));
    }
}
