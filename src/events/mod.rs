//! Kafka adapter: envelope codec, consumer loop, dispatch by topic, dead letters, Redis fast path, outbox relay.

pub mod broker;
pub mod codec;
pub mod consumer;
pub mod dedupe;
pub mod dlq;
pub mod handlers;
pub mod relay;
pub mod scanner;
mod window;
