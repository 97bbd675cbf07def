//! Validation of the settings that are more than a number: URLs, broker lists and JWT keys. Each error names its
//! setting by its environment variable.

use super::{invalid, ConfigError, JwtKey, Secret, MIN_JWT_SECRET_BYTES};

pub(super) fn validate_database_url(url: String) -> Result<String, ConfigError> {
    let ok = ["postgres://", "postgresql://", "sqlite:"]
        .iter()
        .any(|scheme| url.starts_with(scheme));
    if ok {
        Ok(url)
    } else {
        Err(invalid(
            "BOS_DATABASE_URL",
            format!(
                "unsupported URL '{}' (expected postgres://… or sqlite:…)",
                redact_url(&url)
            ),
        ))
    }
}

pub(super) fn validate_brokers(brokers: String) -> Result<String, ConfigError> {
    for broker in brokers.split(',').map(str::trim) {
        let port_ok = broker
            .rsplit_once(':')
            .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
        if !port_ok {
            return Err(invalid(
                "BOS_KAFKA_BROKERS",
                format!("invalid broker '{broker}' (expected host:port[,host:port…])"),
            ));
        }
    }
    Ok(brokers)
}

pub(super) fn validate_redis_url(url: String) -> Result<Secret, ConfigError> {
    let ok = ["redis://", "rediss://", "redis+unix://", "unix://"]
        .iter()
        .any(|scheme| url.starts_with(scheme));
    if ok {
        Ok(Secret::new(url))
    } else {
        Err(invalid(
            "BOS_REDIS_URL",
            format!(
                "unsupported URL '{}' (expected redis://…)",
                redact_url(&url)
            ),
        ))
    }
}

pub(super) fn validate_bcs_url(url: String) -> Result<String, ConfigError> {
    match reqwest::Url::parse(&url) {
        Ok(parsed) if matches!(parsed.scheme(), "http" | "https") && parsed.has_host() => Ok(url),
        _ => Err(invalid(
            "BOS_BCS_URL",
            format!("invalid URL '{url}' (expected http(s)://host[:port])"),
        )),
    }
}

pub(super) fn validate_jwt(
    secret: Option<String>,
    public_key: Option<String>,
) -> Result<JwtKey, ConfigError> {
    match (secret, public_key) {
        (Some(_), Some(_)) => Err(invalid(
            "BOS_JWT_SECRET",
            "set either BOS_JWT_SECRET or BOS_JWT_PUBLIC_KEY, not both",
        )),
        (Some(secret), None) if secret.len() < MIN_JWT_SECRET_BYTES => Err(invalid(
            "BOS_JWT_SECRET",
            format!("too short: HS256 needs at least {MIN_JWT_SECRET_BYTES} bytes"),
        )),
        (Some(secret), None) => Ok(JwtKey::Secret(Secret::new(secret))),
        (None, Some(key)) => {
            // Accept the PEM text itself or a path to a PEM file.
            let pem = if key.contains("-----BEGIN") {
                key
            } else {
                std::fs::read_to_string(&key).map_err(|e| {
                    invalid(
                        "BOS_JWT_PUBLIC_KEY",
                        format!("neither PEM text nor a readable file '{key}': {e}"),
                    )
                })?
            };
            let parses = jsonwebtoken::DecodingKey::from_rsa_pem(pem.as_bytes()).is_ok()
                || jsonwebtoken::DecodingKey::from_ec_pem(pem.as_bytes()).is_ok();
            if parses {
                Ok(JwtKey::PublicKeyPem(pem))
            } else {
                Err(invalid(
                    "BOS_JWT_PUBLIC_KEY",
                    "not an RSA or EC public key in PEM format",
                ))
            }
        }
        (None, None) => Ok(JwtKey::Development),
    }
}

/// Replaces the password of a `scheme://user:password@host` URL with `***`.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let Some((userinfo, host)) = rest.split_once('@') else {
        return url.to_owned();
    };
    match userinfo.split_once(':') {
        Some((user, _password)) => format!("{scheme}://{user}:***@{host}"),
        None => url.to_owned(),
    }
}
