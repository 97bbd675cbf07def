//! Proto3 JSON ↔ dynamic messages. Parsing checks each top-level field on its own first, so every bad field is
//! named in the answer (the whole-message parser stops at the first error and does not say where it was).

use prost_reflect::{DynamicMessage, MessageDescriptor, ReflectMessage, Value};
use serde::de::DeserializeSeed;

/// One offending field (proto name, or the JSON key as sent when it names no field) and why.
pub type Violation = (String, String);

/// Parses a JSON object into `descriptor`'s message. Both lowerCamelCase and snake_case keys are accepted; unknown
/// keys, wrong types and unknown enum names are violations naming the field.
pub fn message_from_json(
    descriptor: &MessageDescriptor,
    body: &[u8],
) -> Result<DynamicMessage, Vec<Violation>> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(DynamicMessage::new(descriptor.clone()));
    }
    let json: serde_json::Value = serde_json::from_slice(body).map_err(|e| {
        vec![(
            String::new(),
            format!("request body is not valid JSON: {e}"),
        )]
    })?;
    let serde_json::Value::Object(object) = json else {
        return Err(vec![(
            String::new(),
            "request body must be a JSON object".to_owned(),
        )]);
    };
    let mut violations = Vec::new();
    for (key, value) in &object {
        let field = descriptor
            .get_field_by_json_name(key)
            .or_else(|| descriptor.get_field_by_name(key));
        let Some(field) = field else {
            violations.push((key.clone(), "unknown field".to_owned()));
            continue;
        };
        let single =
            serde_json::Value::Object([(key.clone(), value.clone())].into_iter().collect());
        if let Err(error) = parse(descriptor, single) {
            violations.push((field.name().to_owned(), clean(&error.to_string())));
        }
    }
    if !violations.is_empty() {
        return Err(violations);
    }
    parse(descriptor, serde_json::Value::Object(object))
        .map_err(|e| vec![(String::new(), clean(&e.to_string()))])
}

fn parse(
    descriptor: &MessageDescriptor,
    json: serde_json::Value,
) -> Result<DynamicMessage, serde_json::Error> {
    descriptor.clone().deserialize(json)
}

/// serde's messages end with " at line 1 column 12", which means nothing for a value we re-serialised.
fn clean(message: &str) -> String {
    match message.rfind(" at line ") {
        Some(at) => message[..at].to_owned(),
        None => message.to_owned(),
    }
}

/// Sets a top-level field from a path variable, converting the text to the field's scalar type.
pub fn set_path_field(
    message: &mut DynamicMessage,
    name: &str,
    raw: &str,
) -> Result<(), Violation> {
    let field = message
        .descriptor()
        .get_field_by_name(name)
        .ok_or_else(|| (name.to_owned(), "path variable names no field".to_owned()))?;
    let kind = field.kind();
    let value = match kind {
        prost_reflect::Kind::String => Value::String(raw.to_owned()),
        prost_reflect::Kind::Int64
        | prost_reflect::Kind::Sint64
        | prost_reflect::Kind::Sfixed64 => raw
            .parse()
            .map(Value::I64)
            .map_err(|_| (name.to_owned(), format!("'{raw}' is not an integer")))?,
        prost_reflect::Kind::Int32
        | prost_reflect::Kind::Sint32
        | prost_reflect::Kind::Sfixed32 => raw
            .parse()
            .map(Value::I32)
            .map_err(|_| (name.to_owned(), format!("'{raw}' is not an integer")))?,
        _ => {
            return Err((
                name.to_owned(),
                "path variables must bind string or integer fields".to_owned(),
            ))
        }
    };
    message.set_field(&field, value);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::descriptor_pool;

    fn register() -> MessageDescriptor {
        descriptor_pool()
            .get_message_by_name("huleedu.bos.v1.RegisterBatchRequest")
            .unwrap()
    }

    #[test]
    fn accepts_both_spellings() {
        let camel = message_from_json(
            &register(),
            br#"{"expectedEssayCount": 3, "courseCode": "COURSE_CODE_ENG5"}"#,
        );
        let snake = message_from_json(
            &register(),
            br#"{"expected_essay_count": 3, "course_code": "COURSE_CODE_ENG5"}"#,
        );
        assert_eq!(camel.unwrap(), snake.unwrap());
    }

    #[test]
    fn names_every_bad_field() {
        let err = message_from_json(
            &register(),
            br#"{"expectedEssayCount": "many", "courseCode": "FR1", "userId": "mallory"}"#,
        )
        .unwrap_err();
        let mut fields: Vec<&str> = err.iter().map(|(f, _)| f.as_str()).collect();
        fields.sort_unstable();
        assert_eq!(fields, ["course_code", "expected_essay_count", "userId"]);
    }

    #[test]
    fn rejects_non_objects_and_accepts_empty_bodies() {
        assert!(message_from_json(&register(), b"[1]").is_err());
        assert!(message_from_json(&register(), b"{").is_err());
        assert!(message_from_json(&register(), b"").is_ok());
    }
}
