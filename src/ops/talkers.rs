//! Top talkers: which channels, apps and client IPs make the most traffic over the last minute,
//! for the dashboard and `GET /api/v1/stats`.
//!
//! Counting every key exactly would let a flood of distinct IPs or channel names grow memory
//! without bound, so each kind keeps at most [`CAPACITY`] keys per ten-second bucket with the
//! space-saving algorithm: a new key arriving at a full bucket replaces the least-counted one
//! and inherits its count, so a key that really talks a lot is never lost and its count is
//! over-estimated by at most the count it inherited. The minute is six such buckets; a hit
//! touches only the newest, and [`Talkers::rotate`] (called every ten seconds by the dashboard's
//! sampler) drops the oldest.

use std::collections::VecDeque;
use std::hash::{BuildHasher, Hash};
use std::net::IpAddr;
use std::sync::Arc;

use parking_lot::Mutex;
use serde::Serialize;

use crate::fast_map::FastMap;

/// Keys one bucket of one kind remembers.
pub const CAPACITY: usize = 64;
/// One bucket's span; the window is `BUCKETS` of them.
pub const BUCKET_SECONDS: u64 = 10;
const BUCKETS: usize = 6;
/// The span the counts cover.
pub const WINDOW_SECONDS: u64 = BUCKET_SECONDS * BUCKETS as u64;

/// One kind's buckets, newest last: per key a count and what to show for it (`V`).
struct Window<K, V> {
    buckets: VecDeque<FastMap<K, (u64, V)>>,
    evictions: metrics::Counter,
}

impl<K: Hash + Eq + Clone, V: Clone> Window<K, V> {
    fn new(kind: &'static str) -> Self {
        let mut buckets = VecDeque::with_capacity(BUCKETS);
        buckets.push_back(FastMap::default());
        Self { buckets, evictions: metrics::counter!("weir_top_talkers_evictions_total", "kind" => kind) }
    }

    /// Counts `by` for `key`; `label` is made only when the key is new to the bucket.
    fn hit<Q>(&mut self, key: &Q, by: u64, label: impl FnOnce() -> (K, V))
    where
        K: std::borrow::Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let Some(bucket) = self.buckets.back_mut() else { return };
        if let Some((count, _)) = bucket.get_mut(key) {
            *count += by;
            return;
        }
        let mut inherited = 0;
        if bucket.len() >= CAPACITY {
            // Bounded at CAPACITY, so this scan is short; it runs only when a new key meets a
            // full bucket.
            if let Some(least) = bucket.iter().min_by_key(|(_, (c, _))| *c).map(|(k, _)| k.clone()) {
                inherited = bucket.remove::<K>(&least).map_or(0, |(c, _)| c);
                self.evictions.increment(1);
            }
        }
        let (key, shown) = label();
        bucket.insert(key, (inherited + by, shown));
    }

    fn rotate(&mut self) {
        if self.buckets.len() == BUCKETS {
            self.buckets.pop_front();
        }
        self.buckets.push_back(FastMap::default());
    }

    /// The `n` keys with the highest counts over the window, highest first, each as `show`
    /// makes it (ties in that order, so the answer is stable).
    fn top<T: Ord>(&self, n: usize, show: impl Fn(&K, &V) -> T) -> Vec<(T, u64)> {
        let mut sums: FastMap<&K, (u64, &V)> = FastMap::default();
        for bucket in &self.buckets {
            for (k, (c, v)) in bucket {
                sums.entry(k).or_insert((0, v)).0 += c;
            }
        }
        let mut all: Vec<(T, u64)> = sums.into_iter().map(|(k, (c, v))| (show(k, v), c)).collect();
        all.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        all.truncate(n);
        all
    }
}

/// An app's id and a channel's name, shown for a channel's hash.
type ChannelName = Arc<(Box<str>, Box<str>)>;

/// The traffic counted per kind; one per server. A channel is keyed by a hash of its app and
/// name, so that counting a publish allocates nothing unless the channel is new to the bucket.
pub struct Talkers {
    channels: Mutex<Window<u64, ChannelName>>,
    apps: Mutex<Window<Box<str>, ()>>,
    ips: Mutex<Window<IpAddr, ()>>,
    hasher: foldhash::fast::RandomState,
}

impl Default for Talkers {
    fn default() -> Self {
        Self {
            channels: Mutex::new(Window::new("channel")),
            apps: Mutex::new(Window::new("app")),
            ips: Mutex::new(Window::new("ip")),
            hasher: foldhash::fast::RandomState::default(),
        }
    }
}

/// One row of a top-talkers list.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChannelTalker {
    pub app: String,
    pub channel: String,
    pub count: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AppTalker {
    pub app: String,
    pub count: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct IpTalker {
    pub ip: IpAddr,
    pub count: u64,
}

/// What `GET /api/v1/stats` reports as `top`.
#[derive(Debug, Clone, Serialize)]
pub struct TopTalkers {
    pub window_seconds: u64,
    pub channels: Vec<ChannelTalker>,
    pub apps: Vec<AppTalker>,
    pub ips: Vec<IpTalker>,
}

impl Talkers {
    /// An event published on `channel` of `app`, delivered to `messages` subscribers here:
    /// counts one event for the channel and `messages` messages for the app.
    pub fn event(&self, app: &str, channel: &str, messages: usize) {
        let hash = self.hasher.hash_one((app, channel));
        self.channels.lock().hit(&hash, 1, || (hash, Arc::new((app.into(), channel.into()))));
        if messages > 0 {
            self.apps.lock().hit(app, messages as u64, || (app.into(), ()));
        }
    }

    /// A new visitor ticket or realtime connection from `ip`.
    pub fn ip(&self, ip: IpAddr) {
        self.ips.lock().hit(&ip, 1, || (ip, ()));
    }

    /// Starts a new ten-second bucket, dropping the oldest.
    pub fn rotate(&self) {
        self.channels.lock().rotate();
        self.apps.lock().rotate();
        self.ips.lock().rotate();
    }

    /// The `n` biggest of each kind over the last [`WINDOW_SECONDS`].
    pub fn top(&self, n: usize) -> TopTalkers {
        let channels = self.channels.lock().top(n, |_, names| names.clone());
        let apps = self.apps.lock().top(n, |app, ()| app.clone());
        let ips = self.ips.lock().top(n, |ip, ()| *ip);
        TopTalkers {
            window_seconds: WINDOW_SECONDS,
            channels: channels
                .into_iter()
                .map(|(names, count)| ChannelTalker { app: names.0.to_string(), channel: names.1.to_string(), count })
                .collect(),
            apps: apps.into_iter().map(|(app, count)| AppTalker { app: app.into(), count }).collect(),
            ips: ips.into_iter().map(|(ip, count)| IpTalker { ip, count }).collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, last])
    }

    #[test]
    fn counts_are_summed_over_the_window_and_forgotten_after_it() {
        let t = Talkers::default();
        t.event("a", "news", 3);
        t.event("a", "news", 2);
        t.event("b", "news", 1);
        t.ip(ip(1));
        t.rotate();
        t.event("a", "news", 1);
        t.ip(ip(1));
        t.ip(ip(2));
        let top = t.top(10);
        assert_eq!(
            top.channels,
            [
                ChannelTalker { app: "a".into(), channel: "news".into(), count: 3 },
                ChannelTalker { app: "b".into(), channel: "news".into(), count: 1 },
            ]
        );
        assert_eq!(top.apps, [AppTalker { app: "a".into(), count: 6 }, AppTalker { app: "b".into(), count: 1 }]);

        assert_eq!(top.ips, [IpTalker { ip: ip(1), count: 2 }, IpTalker { ip: ip(2), count: 1 }]);
        for _ in 0..BUCKETS - 1 {
            t.rotate();
        }
        // The first bucket is gone; the second (one hit of each) remains.
        let top = t.top(10);
        assert_eq!(top.channels, [ChannelTalker { app: "a".into(), channel: "news".into(), count: 1 }]);
        assert_eq!(top.ips, [IpTalker { ip: ip(1), count: 1 }, IpTalker { ip: ip(2), count: 1 }]);
        t.rotate();
        let top = t.top(10);
        assert!(top.channels.is_empty() && top.apps.is_empty() && top.ips.is_empty());
    }

    #[test]
    fn an_event_nobody_receives_counts_for_its_channel_but_delivers_no_message() {
        let t = Talkers::default();
        t.event("c", "empty", 0);
        let top = t.top(10);
        assert_eq!(top.channels, [ChannelTalker { app: "c".into(), channel: "empty".into(), count: 1 }]);
        assert!(top.apps.is_empty());
    }

    #[test]
    fn a_flood_of_distinct_keys_stays_bounded_and_the_heavy_hitter_survives_it() {
        let t = Talkers::default();
        for i in 0..10_000u32 {
            t.ip(IpAddr::from(i.to_be_bytes()));
            if i % 10 == 0 {
                t.ip(ip(200));
            }
        }
        assert!(t.ips.lock().buckets.back().unwrap().len() <= CAPACITY);
        let top = t.top(1);
        // Space-saving: the heavy key is kept and never under-counted.
        assert_eq!(top.ips[0].ip, ip(200));
        assert!(top.ips[0].count >= 1_000, "{:?}", top.ips);
        for i in 0..10_000u32 {
            t.event("a", &format!("ch-{i}"), 1);
        }
        assert!(t.channels.lock().buckets.back().unwrap().len() <= CAPACITY);
    }
}
