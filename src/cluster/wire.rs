//! The bus's wire format. Messages travel on `{prefix}:rt` (every node) and `{prefix}:rt:{node}`
//! (one node's query replies) as `"{serial} {json message}"`: the serial is the first channel's
//! for an event (an event to n channels takes n consecutive serials) and 0 for the others.

use serde::{Deserialize, Serialize};

use crate::realtime::tenant::{ChannelFilter, ChannelReport};

/// Numbers `n` events (the counter never falls below the wall clock in µs, as a single node's
/// serials do not, so serials keep increasing when Redis loses its data) and publishes them as
/// one message prefixed with the first serial.
pub(super) const PUBLISH_SCRIPT: &str = r"
local n = tonumber(ARGV[3])
local last = redis.call('INCRBY', KEYS[1], n)
local floor = tonumber(ARGV[2]) + n
if last < floor then
  redis.call('SET', KEYS[1], string.format('%.0f', floor))
  last = floor
end
local first = string.format('%.0f', last - n + 1)
redis.call('PUBLISH', KEYS[2], first .. ' ' .. ARGV[1])
return first
";

#[derive(Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
pub(super) enum Message {
    Event {
        app: String,
        channels: Vec<String>,
        event: String,
        data: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        user_id: Option<String>,
        /// The socket id the event is not sent to (the sender of a client event, or the
        /// `socket_id` of an HTTP trigger), on whichever node it is connected.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        except: Option<String>,
    },
    Terminate { app: String, user_id: String },
    /// `user_id` joined (`info`) or left (`None`) presence channel `channel` on `node`.
    Member {
        node: String,
        app: String,
        channel: String,
        user_id: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        info: Option<serde_json::Value>,
    },
    /// `user_id` signed in on `node` (`online`), or their last connection there ended.
    Online { node: String, app: String, user_id: String, online: bool },
    /// `node` has `count` connections subscribed to `channel` (apps with `subscription_count`).
    Count { node: String, app: String, channel: String, count: usize },
    /// `node` (re)joined the bus: every other node announces its presence members, signed-in
    /// users and subscription counts again.
    Sync { node: String },
    /// A waiting-room message (`room::sync`), opaque to the bus.
    Room { node: String, body: String },
    /// App `id` was created, changed or deleted through `node`'s admin API: reload it.
    App { node: String, id: String },
    Query { from: String, id: u64, app: String, filter: ChannelFilter },
    Reply { node: String, id: u64, channels: Vec<ChannelReport> },
}

pub(super) fn encode(message: &Message) -> String {
    serde_json::to_string(message).unwrap_or_default()
}

pub(super) fn decode(payload: &[u8]) -> Option<(u64, Message)> {
    let space = payload.iter().position(|&b| b == b' ')?;
    let serial = std::str::from_utf8(&payload[..space]).ok()?.parse().ok()?;
    let message = serde_json::from_slice(&payload[space + 1..]).ok()?;
    Some((serial, message))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_with_their_serial() {
        let m = Message::Event {
            app: "1".into(),
            channels: vec!["a".into(), "b".into()],
            event: "e".into(),
            data: "{\"x\":1}".into(),
            user_id: None,
            except: Some("1.2".into()),
        };
        let wire = format!("1796351066852000 {}", encode(&m));
        let Some((serial, Message::Event { channels, except, .. })) = decode(wire.as_bytes()) else { panic!("not decoded") };
        assert_eq!(serial, 1_796_351_066_852_000);
        assert_eq!(channels, ["a", "b"]);
        assert_eq!(except.as_deref(), Some("1.2"));
        assert!(decode(b"12").is_none(), "no message");
        assert!(decode(b"x {}").is_none(), "no serial");
        assert!(decode(b"1 {\"t\":\"nope\"}").is_none(), "unknown kind");
    }
}
