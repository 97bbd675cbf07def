//! Kafka adapter: envelope codec, consumer loop, dispatch by topic, dead letters, Redis fast path, outbox relay.

pub mod codec;
pub mod dlq;
pub mod consumer;
pub mod dedupe;
pub mod handlers;
pub mod broker;
pub mod relay;
pub mod scanner;
