//! Real-time updates: the in-process change feed (WatchBatch), Redis pub/sub (owner notifications, other
//! replicas' changes), and the repository decorator that tells them about each commit.

pub mod feed;
pub mod observed;
pub mod redis;
