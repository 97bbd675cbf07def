//! Code generated from `proto/` by build.rs, and the embedded descriptor set.
//!
//! The descriptor set keeps the custom options (`google.api.http`, `huleedu.events.v1.topic`),
//! so HTTP bindings and Kafka topic names are read from here rather than repeated in code.

use std::sync::LazyLock;

use prost_reflect::{DescriptorPool, DynamicMessage, ExtensionDescriptor, Value};

/// Generated messages and services, one module per protobuf package.
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod huleedu {
    /// `huleedu.common.v1`: enums and values shared by the API and the events.
    pub mod common {
        /// Version 1.
        pub mod v1 {
            tonic::include_proto!("huleedu.common.v1");
        }
    }
    /// `huleedu.bos.v1`: the gRPC API of BOS.
    pub mod bos {
        /// Version 1.
        pub mod v1 {
            tonic::include_proto!("huleedu.bos.v1");
        }
    }
    /// `huleedu.events.v1`: the Kafka envelope and event payloads.
    pub mod events {
        /// Version 1.
        pub mod v1 {
            tonic::include_proto!("huleedu.events.v1");
        }
    }
}

/// The `google.api` HTTP annotation messages (our own copy of the public definitions).
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod google {
    /// `google.api`.
    pub mod api {
        tonic::include_proto!("google.api");
    }
}

/// Encoded `FileDescriptorSet` of every file in `proto/` and its imports, options intact.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/bos_descriptor.bin"));

/// Full name of the message option that declares a payload's Kafka topic.
pub const TOPIC_OPTION: &str = "huleedu.events.v1.topic";
/// Full name of the method option that declares an RPC's HTTP binding.
pub const HTTP_OPTION: &str = "google.api.http";

static POOL: LazyLock<DescriptorPool> = LazyLock::new(|| {
    // The bytes are produced by build.rs from protox output, so a decode failure is a build
    // defect caught by tests/descriptors.rs, not a runtime condition.
    DescriptorPool::decode(FILE_DESCRIPTOR_SET).expect("embedded descriptor set is valid")
});

/// The descriptor pool of every BOS contract, built on first use.
pub fn descriptor_pool() -> &'static DescriptorPool {
    &POOL
}

fn extension(name: &str) -> Option<ExtensionDescriptor> {
    descriptor_pool().get_extension_by_name(name)
}

/// The Kafka topic declared on the message `message_full_name` (e.g.
/// `huleedu.events.v1.BatchEssaysReady`), or `None` if the message is unknown or has no topic.
pub fn topic_of(message_full_name: &str) -> Option<String> {
    TOPICS
        .iter()
        .find_map(|(message, topic)| (message == message_full_name).then(|| topic.clone()))
}

/// Scanned once: every consumed record and every encoded effect asks, and reading the options out of the
/// descriptor pool each time cost ~75,000 instructions per consumed record (callgrind, `bos bench transitions`).
static TOPICS: LazyLock<Vec<(String, String)>> = LazyLock::new(scan_event_topics);

fn topic_from_options(options: &DynamicMessage, ext: &ExtensionDescriptor) -> Option<String> {
    if !options.has_extension(ext) {
        return None;
    }
    match options.get_extension(ext).as_ref() {
        Value::String(topic) if !topic.is_empty() => Some(topic.clone()),
        _ => None,
    }
}

/// Every message that declares a topic, as `(message full name, topic)`, sorted by message name.
pub fn event_topics() -> Vec<(String, String)> {
    TOPICS.clone()
}

fn scan_event_topics() -> Vec<(String, String)> {
    let Some(ext) = extension(TOPIC_OPTION) else {
        return Vec::new();
    };
    let mut topics: Vec<(String, String)> = descriptor_pool()
        .all_messages()
        .filter_map(|message| {
            topic_from_options(&message.options(), &ext)
                .map(|topic| (message.full_name().to_owned(), topic))
        })
        .collect();
    topics.sort();
    topics
}

/// The message full name that declares `topic`, if any.
pub fn message_for_topic(topic: &str) -> Option<String> {
    TOPICS
        .iter()
        .find_map(|(message, t)| (t == topic).then(|| message.clone()))
}

/// One HTTP binding of an RPC method, read from its `google.api.http` option.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpBinding {
    /// Full method name, e.g. `huleedu.bos.v1.BatchService.RegisterBatch`.
    pub method: String,
    /// Upper-case HTTP verb, e.g. `POST`.
    pub verb: String,
    /// Path template, e.g. `/v1/batches/{batch_id}/status`.
    pub path: String,
    /// Request field mapped to the body: `*`, a field name, or empty for no body.
    pub body: String,
}

/// Every HTTP binding of every service method (additional bindings included), sorted by
/// method name then path.
pub fn http_rules() -> Vec<HttpBinding> {
    let Some(ext) = extension(HTTP_OPTION) else {
        return Vec::new();
    };
    let mut rules = Vec::new();
    for service in descriptor_pool().services() {
        for method in service.methods() {
            let options = method.options();
            if !options.has_extension(&ext) {
                continue;
            }
            if let Value::Message(rule) = options.get_extension(&ext).as_ref() {
                collect_bindings(method.full_name(), rule, &mut rules);
            }
        }
    }
    rules.sort_by(|a, b| (&a.method, &a.path).cmp(&(&b.method, &b.path)));
    rules
}

fn collect_bindings(method: &str, rule: &DynamicMessage, out: &mut Vec<HttpBinding>) {
    let text = |name: &str| match rule.get_field_by_name(name).as_deref() {
        Some(Value::String(s)) => s.clone(),
        _ => String::new(),
    };
    let pattern = ["get", "put", "post", "delete", "patch"]
        .into_iter()
        .find(|verb| rule.has_field_by_name(verb))
        .map(|verb| (verb.to_ascii_uppercase(), text(verb)))
        .or_else(|| match rule.get_field_by_name("custom").as_deref() {
            Some(Value::Message(custom)) if rule.has_field_by_name("custom") => {
                let field = |name: &str| match custom.get_field_by_name(name).as_deref() {
                    Some(Value::String(s)) => s.clone(),
                    _ => String::new(),
                };
                Some((field("kind").to_ascii_uppercase(), field("path")))
            }
            _ => None,
        });
    if let Some((verb, path)) = pattern {
        out.push(HttpBinding {
            method: method.to_owned(),
            verb,
            path,
            body: text("body"),
        });
    }
    if let Some(Value::List(extra)) = rule.get_field_by_name("additional_bindings").as_deref() {
        for binding in extra {
            if let Value::Message(binding) = binding {
                collect_bindings(method, binding, out);
            }
        }
    }
}
