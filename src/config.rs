//! Service configuration: defaults → optional TOML file → `BOS_*` environment → command-line flags,
//! each layer overriding the one before, then validated once at start-up.
//!
//! Every error names the setting by its environment variable, so an operator knows what to fix
//! whichever layer the bad value came from. Secrets never appear in `Debug` or `Display` output.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

pub use validate::redact_url;
use validate::{
    validate_bcs_url, validate_brokers, validate_database_url, validate_jwt, validate_redis_url,
};

/// Default listen address: loopback only, so a development run is not exposed by accident.
pub const DEFAULT_LISTEN_ADDR: &str = "127.0.0.1:50051";
/// Default data directory for the embedded SQLite database.
pub const DEFAULT_DATA_DIR: &str = ".bos";
/// Default phase timeout: one hour.
pub const DEFAULT_PHASE_TIMEOUT_SECS: u64 = 3600;
/// Default retention of published outbox rows and processed-event ids: a week.
pub const DEFAULT_RETENTION_HOURS: u64 = 168;
const MAX_RETENTION_HOURS: u64 = 24 * 366;
/// Default of `BOS_STATUS_CACHE_MAX_AGE_MS`; more than a minute is refused (it bounds staleness).
pub const DEFAULT_STATUS_CACHE_MAX_AGE_MS: u64 = 1000;
const MAX_STATUS_CACHE_MAX_AGE_MS: u64 = 60_000;
/// Default Kafka consumer group.
pub const DEFAULT_KAFKA_GROUP: &str = "bos";
const MAX_COMMIT_LANES: u64 = 64;

const MAX_PHASE_TIMEOUT_SECS: u64 = 7 * 24 * 3600;
const MIN_JWT_SECRET_BYTES: usize = 32;
const MIN_INTERNAL_API_KEY_BYTES: usize = 16;

/// A configuration error; the message starts with the setting's environment variable name.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A setting has a value that cannot be used.
    #[error("{setting}: {reason}")]
    Invalid {
        /// Environment variable name of the setting.
        setting: &'static str,
        /// What is wrong with the value (secrets are never echoed).
        reason: String,
    },
    /// The configuration file could not be read.
    #[error("configuration file {path}")]
    ReadFile {
        /// The file given with `--config`.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The configuration file is not valid TOML or has unknown keys.
    #[error("configuration file {path}")]
    ParseFile {
        /// The file given with `--config`.
        path: PathBuf,
        /// The TOML error.
        source: Box<toml::de::Error>,
    },
}

fn invalid(setting: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        setting,
        reason: reason.into(),
    }
}

/// A secret string: printed as `***`, read only through [`Secret::expose`].
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret value; call only where it is used, never to log it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// One configuration layer: every setting optional. The TOML file uses these field names.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigLayer {
    /// `BOS_LISTEN_ADDR`.
    pub listen_addr: Option<String>,
    /// `BOS_DATA_DIR`.
    pub data_dir: Option<PathBuf>,
    /// `BOS_DATABASE_URL`.
    pub database_url: Option<String>,
    /// `BOS_KAFKA_BROKERS`.
    pub kafka_brokers: Option<String>,
    /// `BOS_KAFKA_GROUP`.
    pub kafka_group: Option<String>,
    /// `BOS_REDIS_URL`.
    pub redis_url: Option<String>,
    /// `BOS_JWT_SECRET`.
    pub jwt_secret: Option<String>,
    /// `BOS_JWT_PUBLIC_KEY`.
    pub jwt_public_key: Option<String>,
    /// `BOS_INTERNAL_API_KEY`.
    pub internal_api_key: Option<String>,
    /// `BOS_BCS_URL`.
    pub bcs_url: Option<String>,
    /// `BOS_PHASE_TIMEOUT_SECS`.
    pub phase_timeout_secs: Option<u64>,
    /// `BOS_RETENTION_HOURS`.
    pub retention_hours: Option<u64>,
    /// `BOS_STATUS_CACHE_MAX_AGE_MS`.
    pub status_cache_max_age_ms: Option<u64>,
    /// `BOS_COMMIT_LANES`.
    pub commit_lanes: Option<u64>,
}

impl ConfigLayer {
    /// Reads a TOML file layer.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::ReadFile {
            path: path.to_owned(),
            source,
        })?;
        toml::from_str(&text).map_err(|source| ConfigError::ParseFile {
            path: path.to_owned(),
            source: Box::new(source),
        })
    }

    /// Reads the `BOS_*` variables from `vars` (pass `std::env::vars()`); empty values count as unset.
    pub fn from_env<I, K, V>(vars: I) -> Result<Self, ConfigError>
    where
        I: IntoIterator<Item = (K, V)>,
        K: AsRef<str>,
        V: Into<String>,
    {
        let mut layer = Self::default();
        for (key, value) in vars {
            let value: String = value.into();
            if value.is_empty() {
                continue;
            }
            match key.as_ref() {
                "BOS_LISTEN_ADDR" => layer.listen_addr = Some(value),
                "BOS_DATA_DIR" => layer.data_dir = Some(PathBuf::from(value)),
                "BOS_DATABASE_URL" => layer.database_url = Some(value),
                "BOS_KAFKA_BROKERS" => layer.kafka_brokers = Some(value),
                "BOS_KAFKA_GROUP" => layer.kafka_group = Some(value),
                "BOS_REDIS_URL" => layer.redis_url = Some(value),
                "BOS_JWT_SECRET" => layer.jwt_secret = Some(value),
                "BOS_JWT_PUBLIC_KEY" => layer.jwt_public_key = Some(value),
                "BOS_INTERNAL_API_KEY" => layer.internal_api_key = Some(value),
                "BOS_BCS_URL" => layer.bcs_url = Some(value),
                "BOS_PHASE_TIMEOUT_SECS" => {
                    layer.phase_timeout_secs =
                        Some(whole_number("BOS_PHASE_TIMEOUT_SECS", "seconds", &value)?);
                }
                "BOS_RETENTION_HOURS" => {
                    layer.retention_hours =
                        Some(whole_number("BOS_RETENTION_HOURS", "hours", &value)?);
                }
                "BOS_STATUS_CACHE_MAX_AGE_MS" => {
                    layer.status_cache_max_age_ms = Some(whole_number(
                        "BOS_STATUS_CACHE_MAX_AGE_MS",
                        "milliseconds",
                        &value,
                    )?);
                }
                "BOS_COMMIT_LANES" => {
                    layer.commit_lanes = Some(whole_number("BOS_COMMIT_LANES", "lanes", &value)?);
                }
                _ => {}
            }
        }
        Ok(layer)
    }

    /// Overrides this layer's settings with those set in `upper`.
    pub fn merge(mut self, upper: ConfigLayer) -> Self {
        macro_rules! take {
            ($($field:ident),*) => { $( if upper.$field.is_some() { self.$field = upper.$field; } )* };
        }
        take!(
            listen_addr,
            data_dir,
            database_url,
            kafka_brokers,
            kafka_group,
            redis_url,
            jwt_secret,
            jwt_public_key,
            internal_api_key,
            bcs_url,
            phase_timeout_secs,
            retention_hours,
            status_cache_max_age_ms,
            commit_lanes
        );
        self
    }
}

fn whole_number(setting: &'static str, unit: &str, value: &str) -> Result<u64, ConfigError> {
    value
        .trim()
        .parse::<u64>()
        .map_err(|_| invalid(setting, format!("not a whole number of {unit} '{value}'")))
}

/// How user tokens are verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JwtKey {
    /// HS256 with a shared secret (`BOS_JWT_SECRET`).
    Secret(Secret),
    /// RS256 or ES256 with a PEM public key (`BOS_JWT_PUBLIC_KEY`).
    PublicKeyPem(String),
    /// Nothing configured: the auth adapter uses a development secret and prints an example token.
    Development,
}

/// The validated configuration of one BOS process.
#[derive(Clone, PartialEq, Eq)]
pub struct Config {
    /// One TCP address for gRPC, HTTP/JSON, `/healthz` and `/metrics`.
    pub listen_addr: SocketAddr,
    /// Where the embedded SQLite database lives when `database_url` is not given.
    pub data_dir: PathBuf,
    /// `postgres://…` or `sqlite:…`; may hold a password, so it is redacted when printed.
    pub database_url: Secret,
    /// Kafka bootstrap servers (`host:port,…`); `None` runs the embedded broker.
    pub kafka_brokers: Option<String>,
    /// Kafka consumer group id.
    pub kafka_group: String,
    /// Redis URL for the dedupe fast path and notifications; `None` disables Redis.
    pub redis_url: Option<Secret>,
    /// How user tokens are verified.
    pub jwt: JwtKey,
    /// Key that internal callers send in `x-internal-api-key`; `None` rejects every internal call.
    pub internal_api_key: Option<Secret>,
    /// Batch Conductor Service base URL; `None` uses the built-in pipeline resolver.
    pub bcs_url: Option<String>,
    /// How long a dispatched phase may run before it fails with a timeout.
    pub phase_timeout: Duration,
    /// How long published outbox rows and processed-event ids are kept (`BOS_RETENTION_HOURS`). The inbox
    /// deduplicates redeliveries only within this window, so it must outlast the longest redelivery.
    pub retention: Duration,
    /// How long a status read may be answered from the aggregate cache without a query while the Redis change
    /// subscription is live (`BOS_STATUS_CACHE_MAX_AGE_MS`; zero never, and never without Redis).
    pub status_cache_max_age: Duration,
    /// Groups of units of work committing at once, each on its own database connection (`BOS_COMMIT_LANES`).
    pub commit_lanes: usize,
}

impl Config {
    /// Defaults, then the `file` layer, then the `env` layer, then `flags`, validated.
    pub fn load(
        file: Option<&Path>,
        env: ConfigLayer,
        flags: ConfigLayer,
    ) -> Result<Self, ConfigError> {
        let file_layer = match file {
            Some(path) => ConfigLayer::from_file(path)?,
            None => ConfigLayer::default(),
        };
        Self::from_layer(file_layer.merge(env).merge(flags))
    }

    /// Validates a merged layer, filling unset settings with their defaults.
    pub fn from_layer(layer: ConfigLayer) -> Result<Self, ConfigError> {
        let listen_text = layer
            .listen_addr
            .unwrap_or_else(|| DEFAULT_LISTEN_ADDR.to_owned());
        let listen_addr = listen_text.trim().parse::<SocketAddr>().map_err(|_| {
            invalid(
                "BOS_LISTEN_ADDR",
                format!("invalid socket address '{listen_text}'"),
            )
        })?;

        let data_dir = layer
            .data_dir
            .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR));
        let database_url = match layer.database_url {
            Some(url) => validate_database_url(url)?,
            None => format!("sqlite://{}?mode=rwc", data_dir.join("bos.db").display()),
        };

        let kafka_brokers = layer.kafka_brokers.map(validate_brokers).transpose()?;
        let kafka_group = layer
            .kafka_group
            .unwrap_or_else(|| DEFAULT_KAFKA_GROUP.to_owned());
        if kafka_group.is_empty()
            || !kafka_group
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        {
            return Err(invalid(
                "BOS_KAFKA_GROUP",
                format!("invalid group id '{kafka_group}' (use letters, digits, '.', '_', '-')"),
            ));
        }

        let redis_url = layer.redis_url.map(validate_redis_url).transpose()?;
        let jwt = validate_jwt(layer.jwt_secret, layer.jwt_public_key)?;

        let internal_api_key = match layer.internal_api_key {
            Some(key) if key.len() < MIN_INTERNAL_API_KEY_BYTES => {
                return Err(invalid(
                    "BOS_INTERNAL_API_KEY",
                    format!("too short: at least {MIN_INTERNAL_API_KEY_BYTES} bytes are required"),
                ));
            }
            other => other.map(Secret::new),
        };

        let bcs_url = layer.bcs_url.map(validate_bcs_url).transpose()?;

        let secs = layer
            .phase_timeout_secs
            .unwrap_or(DEFAULT_PHASE_TIMEOUT_SECS);
        if secs == 0 || secs > MAX_PHASE_TIMEOUT_SECS {
            return Err(invalid(
                "BOS_PHASE_TIMEOUT_SECS",
                format!("{secs} is out of range 1..={MAX_PHASE_TIMEOUT_SECS}"),
            ));
        }

        let hours = layer.retention_hours.unwrap_or(DEFAULT_RETENTION_HOURS);
        if hours == 0 || hours > MAX_RETENTION_HOURS {
            return Err(invalid(
                "BOS_RETENTION_HOURS",
                format!("{hours} is out of range 1..={MAX_RETENTION_HOURS}"),
            ));
        }

        let max_age_ms = layer
            .status_cache_max_age_ms
            .unwrap_or(DEFAULT_STATUS_CACHE_MAX_AGE_MS);
        if max_age_ms > MAX_STATUS_CACHE_MAX_AGE_MS {
            return Err(invalid(
                "BOS_STATUS_CACHE_MAX_AGE_MS",
                format!("{max_age_ms} is out of range 0..={MAX_STATUS_CACHE_MAX_AGE_MS}"),
            ));
        }

        let lanes = layer
            .commit_lanes
            .unwrap_or(u64::from(crate::store::DEFAULT_COMMIT_LANES));
        if lanes == 0 || lanes > MAX_COMMIT_LANES {
            return Err(invalid(
                "BOS_COMMIT_LANES",
                format!("{lanes} is out of range 1..={MAX_COMMIT_LANES}"),
            ));
        }

        Ok(Self {
            listen_addr,
            data_dir,
            database_url: Secret::new(database_url),
            kafka_brokers,
            kafka_group,
            redis_url,
            jwt,
            internal_api_key,
            bcs_url,
            phase_timeout: Duration::from_secs(secs),
            retention: Duration::from_secs(hours * 3600),
            status_cache_max_age: Duration::from_millis(max_age_ms),
            commit_lanes: usize::try_from(lanes).unwrap_or(usize::MAX),
        })
    }

    /// True when the database is the embedded SQLite file (or memory) database.
    pub fn uses_sqlite(&self) -> bool {
        self.database_url.expose().starts_with("sqlite:")
    }
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("listen_addr", &self.listen_addr)
            .field("data_dir", &self.data_dir)
            .field("database_url", &redact_url(self.database_url.expose()))
            .field("kafka_brokers", &self.kafka_brokers)
            .field("kafka_group", &self.kafka_group)
            .field(
                "redis_url",
                &self.redis_url.as_ref().map(|u| redact_url(u.expose())),
            )
            .field("jwt", &self.jwt)
            .field("internal_api_key", &self.internal_api_key)
            .field("bcs_url", &self.bcs_url)
            .field("phase_timeout", &self.phase_timeout)
            .field("retention", &self.retention)
            .field("status_cache_max_age", &self.status_cache_max_age)
            .field("commit_lanes", &self.commit_lanes)
            .finish()
    }
}

impl fmt::Display for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let auth = match &self.jwt {
            JwtKey::Secret(_) => "HS256 secret",
            JwtKey::PublicKeyPem(_) => "public key",
            JwtKey::Development => "development secret",
        };
        write!(
            f,
            "listen={} database={} kafka={} group={} redis={} auth={} internal_key={} bcs={} phase_timeout={}s",
            self.listen_addr,
            redact_url(self.database_url.expose()),
            self.kafka_brokers.as_deref().unwrap_or("embedded"),
            self.kafka_group,
            self.redis_url
                .as_ref()
                .map_or_else(|| "off".to_owned(), |u| redact_url(u.expose())),
            auth,
            if self.internal_api_key.is_some() { "set" } else { "unset" },
            self.bcs_url.as_deref().unwrap_or("built-in resolver"),
            self.phase_timeout.as_secs(),
        )
    }
}

#[cfg(test)]
mod tests;
mod validate;
