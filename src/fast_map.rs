//! Hash maps on per-request paths (room lookup, token cache, sessions) use foldhash with a
//! per-map random seed: SipHash costs about a thousand instructions for a token-sized key,
//! and these keys are either ours (room ids, tickets) or only stored once proven (signed tokens).

pub type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
pub type FastSet<T> = std::collections::HashSet<T, foldhash::fast::RandomState>;
