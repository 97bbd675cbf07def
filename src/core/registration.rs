//! RegisterBatch input as a transport decodes it, and its validation. Every field violation is reported at once,
//! named as the API names the field.

use super::ids::{
    BatchId, ClassId, CorrelationId, CourseCode, EssayId, InvalidValue, OrgId, UserId,
};
use super::input::NewBatch;

pub const MAX_ESSAYS: i64 = 10_000;
pub const MAX_ASSIGNMENT_ID_LEN: usize = 100;
pub const MAX_TEXT_LEN: usize = 512;
pub const MAX_TEMPERATURE: f64 = 2.0;

/// Plain values, as decoded from the request; nothing checked yet. Empty strings count as absent.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RawRegistration {
    pub expected_essay_count: i64,
    /// `ENG5` or the enum value name `COURSE_CODE_ENG5`, any case.
    pub course_code: String,
    pub class_id: Option<String>,
    pub student_prompt_ref: Option<String>,
    pub assignment_id: Option<String>,
    pub cj_default_llm_model: Option<String>,
    pub cj_default_temperature: Option<f64>,
}

/// A registration that passed validation; the owner comes from the caller's identity, never the body.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidRegistration {
    pub owner: UserId,
    pub org_id: Option<OrgId>,
    pub expected_essay_count: u32,
    pub course_code: CourseCode,
    pub class_id: Option<ClassId>,
    pub student_prompt_ref: Option<String>,
    pub assignment_id: Option<String>,
    pub cj_default_llm_model: Option<String>,
    pub cj_default_temperature: Option<f64>,
}

impl ValidRegistration {
    /// The core input, with the ids the caller generated (one essay id per expected essay).
    pub fn into_new_batch(
        self,
        batch_id: BatchId,
        correlation_id: CorrelationId,
        essay_ids: Vec<EssayId>,
    ) -> NewBatch {
        NewBatch {
            batch_id,
            correlation_id,
            owner: self.owner,
            org_id: self.org_id,
            class_id: self.class_id,
            course_code: self.course_code,
            essay_ids,
            student_prompt_ref: self.student_prompt_ref,
            assignment_id: self.assignment_id,
            cj_default_llm_model: self.cj_default_llm_model,
            cj_default_temperature: self.cj_default_temperature,
        }
    }
}

/// A pipeline request's prompt reference: empty is absent; otherwise the rules of `student_prompt_ref`, reported
/// under the request's own field name.
pub fn prompt_ref(raw: Option<String>) -> Result<Option<String>, InvalidValue> {
    let mut errors = Vec::new();
    let value = bounded_text("prompt_ref", raw, MAX_TEXT_LEN, &mut errors);
    match errors.pop() {
        Some(error) => Err(error),
        None => Ok(value),
    }
}

fn present(raw: Option<String>) -> Option<String> {
    raw.map(|s| s.trim().to_owned()).filter(|s| !s.is_empty())
}

fn bounded_text(
    field: &'static str,
    raw: Option<String>,
    max: usize,
    errors: &mut Vec<InvalidValue>,
) -> Option<String> {
    let value = present(raw)?;
    if value.chars().count() > max {
        errors.push(InvalidValue::new(
            field,
            format!("must be at most {max} characters"),
        ));
        return None;
    }
    if value.chars().any(char::is_control) {
        errors.push(InvalidValue::new(
            field,
            "must not contain control characters",
        ));
        return None;
    }
    Some(value)
}

fn course_code(raw: &str) -> Result<CourseCode, InvalidValue> {
    let trimmed = raw.trim();
    let upper = trimmed.to_ascii_uppercase();
    let name = upper.strip_prefix("COURSE_CODE_").unwrap_or(&upper);
    CourseCode::parse("course_code", name).map_err(|_| {
        InvalidValue::new(
            "course_code",
            format!("unknown course code '{trimmed}'; one of ENG5, ENG6, ENG7, SV1, SV2, SV3"),
        )
    })
}

/// Checks every field and returns all violations together.
pub fn validate(
    raw: RawRegistration,
    owner: UserId,
    org_id: Option<OrgId>,
) -> Result<ValidRegistration, Vec<InvalidValue>> {
    let mut errors = Vec::new();
    let count = u32::try_from(raw.expected_essay_count)
        .ok()
        .filter(|n| (1..=MAX_ESSAYS).contains(&i64::from(*n)));
    if count.is_none() {
        errors.push(InvalidValue::new(
            "expected_essay_count",
            format!(
                "must be between 1 and {MAX_ESSAYS}, got {}",
                raw.expected_essay_count
            ),
        ));
    }
    let course = course_code(&raw.course_code)
        .map_err(|e| errors.push(e))
        .ok();
    let class_id = present(raw.class_id).and_then(|c| {
        ClassId::parse("class_id", &c)
            .map_err(|e| errors.push(e))
            .ok()
    });
    let student_prompt_ref = bounded_text(
        "student_prompt_ref",
        raw.student_prompt_ref,
        MAX_TEXT_LEN,
        &mut errors,
    );
    let assignment_id = bounded_text(
        "assignment_id",
        raw.assignment_id,
        MAX_ASSIGNMENT_ID_LEN,
        &mut errors,
    );
    let cj_default_llm_model = bounded_text(
        "cj_default_llm_model",
        raw.cj_default_llm_model,
        MAX_TEXT_LEN,
        &mut errors,
    );
    let temperature = raw.cj_default_temperature;
    if let Some(t) = temperature {
        if !t.is_finite() || !(0.0..=MAX_TEMPERATURE).contains(&t) {
            errors.push(InvalidValue::new(
                "cj_default_temperature",
                format!("must be a number from 0 to {MAX_TEMPERATURE}, got {t}"),
            ));
        }
    }
    match (count, course) {
        (Some(expected_essay_count), Some(course_code)) if errors.is_empty() => {
            Ok(ValidRegistration {
                owner,
                org_id,
                expected_essay_count,
                course_code,
                class_id,
                student_prompt_ref,
                assignment_id,
                cj_default_llm_model,
                cj_default_temperature: temperature,
            })
        }
        _ => Err(errors),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owner() -> UserId {
        UserId::parse("user_id", "teacher-1").unwrap()
    }

    fn raw() -> RawRegistration {
        RawRegistration {
            expected_essay_count: 3,
            course_code: "eng5".to_owned(),
            ..RawRegistration::default()
        }
    }

    #[test]
    fn a_minimal_guest_registration_is_valid() {
        let valid = validate(raw(), owner(), None).unwrap();
        assert_eq!(valid.expected_essay_count, 3);
        assert_eq!(valid.course_code, CourseCode::Eng5);
        assert_eq!(valid.class_id, None);
    }

    #[test]
    fn enum_names_and_empty_strings_are_accepted() {
        let valid = validate(
            RawRegistration {
                course_code: "COURSE_CODE_SV2".to_owned(),
                class_id: Some(String::new()),
                assignment_id: Some("  ".to_owned()),
                ..raw()
            },
            owner(),
            None,
        )
        .unwrap();
        assert_eq!(valid.course_code, CourseCode::Sv2);
        assert_eq!((valid.class_id, valid.assignment_id), (None, None));
    }

    #[test]
    fn every_violation_is_reported_with_its_field_name() {
        let errors = validate(
            RawRegistration {
                expected_essay_count: 0,
                course_code: "FR1".to_owned(),
                class_id: Some("c".repeat(129)),
                student_prompt_ref: Some("p".repeat(513)),
                assignment_id: Some("a".repeat(101)),
                cj_default_llm_model: Some("m".repeat(513)),
                cj_default_temperature: Some(f64::NAN),
            },
            owner(),
            None,
        )
        .unwrap_err();
        let fields: Vec<&str> = errors.iter().map(|e| e.field).collect();
        assert_eq!(
            fields,
            vec![
                "expected_essay_count",
                "course_code",
                "class_id",
                "student_prompt_ref",
                "assignment_id",
                "cj_default_llm_model",
                "cj_default_temperature"
            ]
        );
    }

    #[test]
    fn bounds_are_inclusive() {
        let ok = RawRegistration {
            expected_essay_count: MAX_ESSAYS,
            assignment_id: Some("a".repeat(100)),
            cj_default_temperature: Some(2.0),
            ..raw()
        };
        assert!(validate(ok, owner(), None).is_ok());
        for bad in [
            RawRegistration {
                expected_essay_count: MAX_ESSAYS + 1,
                ..raw()
            },
            RawRegistration {
                expected_essay_count: -1,
                ..raw()
            },
            RawRegistration {
                cj_default_temperature: Some(-0.1),
                ..raw()
            },
            RawRegistration {
                cj_default_temperature: Some(f64::INFINITY),
                ..raw()
            },
        ] {
            assert_eq!(validate(bad, owner(), None).unwrap_err().len(), 1);
        }
    }
}
