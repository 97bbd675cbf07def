//! `google.api.http` path templates: literal segments and single-segment variables (`{batch_id}` or
//! `{batch_id=*}`), which is all our rules use. Anything richer is refused when the rules are loaded, so an
//! unsupported template is a start-up error rather than a route that silently never matches.

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(String),
    Variable(String),
}

/// A parsed path template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathTemplate {
    segments: Vec<Segment>,
    text: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unsupported path template '{template}': {reason}")]
pub struct TemplateError {
    pub template: String,
    pub reason: &'static str,
}

impl PathTemplate {
    pub fn parse(template: &str) -> Result<Self, TemplateError> {
        let error = |reason| TemplateError {
            template: template.to_owned(),
            reason,
        };
        let rest = template
            .strip_prefix('/')
            .ok_or_else(|| error("must start with '/'"))?;
        if template.contains(':') {
            return Err(error("verbs (':verb') are not supported"));
        }
        let mut segments = Vec::new();
        for raw in rest.split('/') {
            if let Some(inner) = raw.strip_prefix('{') {
                let inner = inner
                    .strip_suffix('}')
                    .ok_or_else(|| error("unclosed variable"))?;
                let name = match inner.split_once('=') {
                    Some((name, "*")) => name,
                    Some(_) => return Err(error("only single-segment variables are supported")),
                    None => inner,
                };
                if name.is_empty() || name.contains('.') {
                    return Err(error("variables must name a top-level field"));
                }
                segments.push(Segment::Variable(name.to_owned()));
            } else if raw.is_empty() || raw.contains(['{', '}', '*']) {
                return Err(error("empty or wildcard literal segment"));
            } else {
                segments.push(Segment::Literal(raw.to_owned()));
            }
        }
        Ok(Self {
            segments,
            text: template.to_owned(),
        })
    }

    /// The variables bound by `path` (percent-decoded), or `None` if it does not match.
    pub fn matches(&self, path: &str) -> Option<Vec<(String, String)>> {
        let rest = path.strip_prefix('/')?;
        let parts: Vec<&str> = rest.split('/').collect();
        if parts.len() != self.segments.len() {
            return None;
        }
        let mut bound = Vec::new();
        for (segment, part) in self.segments.iter().zip(parts) {
            match segment {
                Segment::Literal(literal) if literal == part => {}
                Segment::Literal(_) => return None,
                Segment::Variable(_) if part.is_empty() => return None,
                Segment::Variable(name) => bound.push((name.clone(), percent_decode(part)?)),
            }
        }
        Some(bound)
    }

    /// Variable names, in order.
    pub fn variables(&self) -> impl Iterator<Item = &str> {
        self.segments.iter().filter_map(|s| match s {
            Segment::Variable(name) => Some(name.as_str()),
            Segment::Literal(_) => None,
        })
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }
}

fn percent_decode(raw: &str) -> Option<String> {
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = raw.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binds_variables_and_rejects_other_paths() {
        let t = PathTemplate::parse("/v1/batches/{batch_id}/status").unwrap();
        assert_eq!(
            t.matches("/v1/batches/abc/status"),
            Some(vec![("batch_id".to_owned(), "abc".to_owned())])
        );
        assert_eq!(
            t.matches("/v1/batches/a%2Db/status"),
            Some(vec![("batch_id".to_owned(), "a-b".to_owned())])
        );
        assert_eq!(t.matches("/v1/batches//status"), None);
        assert_eq!(t.matches("/v1/batches/abc/retry"), None);
        assert_eq!(t.matches("/v1/batches/abc/status/x"), None);
        assert_eq!(t.variables().collect::<Vec<_>>(), ["batch_id"]);
        let literal = PathTemplate::parse("/v1/batches/register").unwrap();
        assert_eq!(literal.matches("/v1/batches/register"), Some(vec![]));
    }

    #[test]
    fn unsupported_templates_are_refused() {
        assert!(PathTemplate::parse("v1/x").is_err());
        assert!(PathTemplate::parse("/v1/{name=batches/*}").is_err());
        assert!(PathTemplate::parse("/v1/x:run").is_err());
        assert!(PathTemplate::parse("/v1/**").is_err());
        assert!(PathTemplate::parse("/v1/{a.b}").is_err());
        assert!(PathTemplate::parse("/v1/{id=*}").is_ok());
    }
}
