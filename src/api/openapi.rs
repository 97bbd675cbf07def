//! The OpenAPI 3.0 document of the HTTP/JSON surface, generated from the same descriptors and `google.api.http`
//! rules the transcoder routes by, so the document cannot drift from what the server answers. Field names are
//! the proto3 JSON (lowerCamelCase) names; int64 values are strings and enums are their names, as served.

use std::collections::BTreeMap;

use prost_reflect::{FieldDescriptor, FileDescriptor, Kind, MessageDescriptor};
use serde_json::{json, Map, Value};

use super::transcode::Rules;

/// Where the rendered document is committed.
pub const COMMITTED_PATH: &str = "docs/openapi.json";

/// The document for `rules`.
pub fn document(rules: &Rules) -> Value {
    let mut paths: BTreeMap<String, Map<String, Value>> = BTreeMap::new();
    let mut schemas: BTreeMap<String, Value> = BTreeMap::new();
    for (verb, template, method, has_body) in rules.iter() {
        let input = method.input();
        let variables = path_variables(template);
        let mut operation = Map::new();
        let service = method.parent_service();
        operation.insert(
            "operationId".into(),
            json!(format!("{}_{}", service.name(), method.name())),
        );
        operation.insert("tags".into(), json!([service.name()]));
        if let Some(text) = comment(&method.parent_file(), method.path()) {
            operation.insert("description".into(), json!(text));
        }
        let parameters: Vec<Value> = variables
            .iter()
            .map(|name| {
                json!({
                    "name": name,
                    "in": "path",
                    "required": true,
                    "schema": input.get_field_by_name(name).map_or_else(|| json!({"type": "string"}), |f| scalar_schema(&f)),
                })
            })
            .collect();
        if !parameters.is_empty() {
            operation.insert("parameters".into(), Value::Array(parameters));
        }
        if has_body {
            let body_schema = if variables.is_empty() {
                collect(&input, &mut schemas);
                reference(&input)
            } else {
                // The path variables are not part of the body.
                message_schema(&input, &variables, &mut schemas)
            };
            operation.insert(
                "requestBody".into(),
                json!({"required": true, "content": {"application/json": {"schema": body_schema}}}),
            );
        }
        let output = method.output();
        collect(&output, &mut schemas);
        operation.insert(
            "responses".into(),
            json!({
                "200": {"description": "OK", "content": {"application/json": {"schema": reference(&output)}}},
                "default": {"description": "An error as a google.rpc.Status", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/google.rpc.Status"}}}},
            }),
        );
        let security = if template.starts_with("/internal/") {
            "internalApiKey"
        } else {
            "bearerAuth"
        };
        operation.insert("security".into(), json!([{ security: [] }]));
        paths
            .entry(template.to_owned())
            .or_default()
            .insert(verb.as_str().to_ascii_lowercase(), Value::Object(operation));
    }
    schemas.insert("google.rpc.Status".into(), status_schema());
    json!({
        "openapi": "3.0.3",
        "info": {
            "title": "BOS (Batch Orchestrator Service) HTTP/JSON API",
            "version": "v1",
            "description": "Generated from the google.api.http rules in proto/. Errors are google.rpc.Status objects.",
        },
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "bearerAuth": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"},
                "internalApiKey": {"type": "apiKey", "in": "header", "name": "x-internal-api-key"},
            },
        },
    })
}

/// The document as committed: pretty JSON with a final newline.
pub fn render(rules: &Rules) -> String {
    let mut text = serde_json::to_string_pretty(&document(rules)).unwrap_or_default();
    text.push('\n');
    text
}

fn path_variables(template: &str) -> Vec<String> {
    template
        .split('/')
        .filter_map(|s| s.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
        .map(|s| s.split('=').next().unwrap_or(s).to_owned())
        .collect()
}

fn reference(message: &MessageDescriptor) -> Value {
    json!({"$ref": format!("#/components/schemas/{}", message.full_name())})
}

fn collect(message: &MessageDescriptor, schemas: &mut BTreeMap<String, Value>) {
    if well_known(message).is_some() || schemas.contains_key(message.full_name()) {
        return;
    }
    // Insert a placeholder first so recursive messages terminate.
    schemas.insert(message.full_name().to_owned(), Value::Null);
    let schema = message_schema(message, &[], schemas);
    schemas.insert(message.full_name().to_owned(), schema);
}

fn message_schema(
    message: &MessageDescriptor,
    skip: &[String],
    schemas: &mut BTreeMap<String, Value>,
) -> Value {
    let mut properties = Map::new();
    for field in message.fields() {
        if skip.iter().any(|s| s == field.name()) {
            continue;
        }
        let mut schema = field_schema(&field, schemas);
        if let (Some(text), Value::Object(map)) =
            (comment(&field.parent_file(), field.path()), &mut schema)
        {
            // `$ref` siblings are ignored by OpenAPI 3.0 tools, so only inline schemas get the text.
            if !map.contains_key("$ref") {
                map.insert("description".into(), json!(text));
            }
        }
        properties.insert(field.json_name().to_owned(), schema);
    }
    let mut schema = json!({"type": "object", "properties": properties});
    if let Some(text) = comment(&message.parent_file(), message.path()) {
        schema["description"] = json!(text);
    }
    schema
}

/// The leading comment of the element at `path` in `file`, one line per comment line.
fn comment(file: &FileDescriptor, path: &[i32]) -> Option<String> {
    let proto = file.file_descriptor_proto();
    let location = proto
        .source_code_info
        .as_ref()?
        .location
        .iter()
        .find(|l| l.path == path)?;
    let text = location
        .leading_comments
        .as_deref()?
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("\n");
    (!text.is_empty()).then_some(text)
}

fn field_schema(field: &FieldDescriptor, schemas: &mut BTreeMap<String, Value>) -> Value {
    if field.is_map() {
        if let Kind::Message(entry) = field.kind() {
            let value = entry.map_entry_value_field();
            return json!({"type": "object", "additionalProperties": single_schema(&value, schemas)});
        }
    }
    let item = single_schema(field, schemas);
    if field.is_list() {
        json!({"type": "array", "items": item})
    } else {
        item
    }
}

fn single_schema(field: &FieldDescriptor, schemas: &mut BTreeMap<String, Value>) -> Value {
    match field.kind() {
        Kind::Message(message) => match well_known(&message) {
            Some(schema) => schema,
            None => {
                collect(&message, schemas);
                reference(&message)
            }
        },
        _ => scalar_schema(field),
    }
}

fn scalar_schema(field: &FieldDescriptor) -> Value {
    match field.kind() {
        Kind::Double | Kind::Float => json!({"type": "number"}),
        Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 => {
            json!({"type": "integer", "format": "int32"})
        }
        Kind::Uint32 | Kind::Fixed32 => json!({"type": "integer", "format": "int64", "minimum": 0}),
        Kind::Int64 | Kind::Sint64 | Kind::Sfixed64 => json!({"type": "string", "format": "int64"}),
        Kind::Uint64 | Kind::Fixed64 => json!({"type": "string", "format": "uint64"}),
        Kind::Bool => json!({"type": "boolean"}),
        Kind::String => json!({"type": "string"}),
        Kind::Bytes => json!({"type": "string", "format": "byte"}),
        Kind::Enum(e) => {
            json!({"type": "string", "enum": e.values().map(|v| v.name().to_owned()).collect::<Vec<_>>()})
        }
        Kind::Message(m) => reference(&m),
    }
}

fn well_known(message: &MessageDescriptor) -> Option<Value> {
    Some(match message.full_name() {
        "google.protobuf.Timestamp" => json!({"type": "string", "format": "date-time"}),
        "google.protobuf.Duration" => {
            json!({"type": "string", "pattern": "^-?[0-9]+(\\.[0-9]{1,9})?s$"})
        }
        "google.protobuf.Any" => {
            json!({"type": "object", "properties": {"@type": {"type": "string"}}, "additionalProperties": true})
        }
        "google.protobuf.Struct" | "google.protobuf.Value" => json!({}),
        _ => return None,
    })
}

fn status_schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "code": {"type": "integer", "format": "int32", "description": "google.rpc.Code"},
            "message": {"type": "string"},
            "details": {
                "type": "array",
                "items": {"type": "object", "properties": {"@type": {"type": "string"}}, "additionalProperties": true},
            },
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::descriptor_pool;

    #[test]
    fn every_http_rule_becomes_an_operation_with_json_names() {
        let rules = Rules::from_descriptors(descriptor_pool()).unwrap();
        let doc = document(&rules);
        assert!(doc["paths"]["/v1/batches/register"]["post"]["requestBody"].is_object());
        assert_eq!(
            doc["paths"]["/v1/batches/{batch_id}/status"]["get"]["parameters"][0]["name"],
            "batch_id"
        );
        assert!(doc["paths"]["/internal/v1/batches/{batch_id}/pipeline-state"]["get"].is_object());
        let view = &doc["components"]["schemas"]["huleedu.bos.v1.BatchView"]["properties"];
        assert_eq!(view["version"]["type"], "string");
        assert_eq!(view["createdAt"]["format"], "date-time");
        assert!(view["pastRuns"]["items"]["$ref"].is_string());
        let retry_body = &doc["paths"]["/v1/batches/{batch_id}/retry"]["post"]["requestBody"]
            ["content"]["application/json"]["schema"];
        assert!(retry_body["properties"]["batchId"].is_null());
        assert!(retry_body["properties"]["phase"]["enum"].is_array());
    }
}
