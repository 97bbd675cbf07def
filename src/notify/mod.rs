//! Real-time updates: the in-process change feed (WatchBatch) and Redis pub/sub (owner notifications, other
//! replicas' changes). Both are `CommitObserver`s, told about each commit by the group committer.

pub mod feed;
pub mod redis;
