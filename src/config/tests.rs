use super::*;

const SECRET: &str = "0123456789abcdef0123456789abcdef";

fn env(pairs: &[(&str, &str)]) -> ConfigLayer {
    ConfigLayer::from_env(pairs.iter().map(|(k, v)| (*k, *v))).unwrap()
}

fn write_file(text: &str) -> tempfile_path::TempFile {
    tempfile_path::TempFile::new(text)
}

/// A file removed on drop; tests run in parallel, so each gets a unique name.
mod tempfile_path {
    use std::path::PathBuf;

    pub struct TempFile(pub PathBuf);

    impl TempFile {
        pub fn new(text: &str) -> Self {
            let path =
                std::env::temp_dir().join(format!("bos-config-{}.toml", uuid::Uuid::now_v7()));
            std::fs::write(&path, text).unwrap();
            Self(path)
        }
    }

    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}

#[test]
fn defaults_apply_when_nothing_is_set() {
    let config = Config::load(None, ConfigLayer::default(), ConfigLayer::default()).unwrap();
    assert_eq!(config.listen_addr, "127.0.0.1:50051".parse().unwrap());
    assert_eq!(
        config.database_url.expose(),
        "sqlite://.bos/bos.db?mode=rwc"
    );
    assert!(config.uses_sqlite());
    assert_eq!(config.kafka_brokers, None);
    assert_eq!(config.kafka_group, "bos");
    assert_eq!(config.redis_url, None);
    assert_eq!(config.jwt, JwtKey::Development);
    assert_eq!(config.internal_api_key, None);
    assert_eq!(config.bcs_url, None);
    assert_eq!(config.phase_timeout, Duration::from_secs(3600));
}

#[test]
fn data_dir_moves_the_default_sqlite_file() {
    let config = Config::from_layer(ConfigLayer {
        data_dir: Some("/var/lib/bos".into()),
        ..Default::default()
    })
    .unwrap();
    assert_eq!(
        config.database_url.expose(),
        "sqlite:///var/lib/bos/bos.db?mode=rwc"
    );
}

#[test]
fn file_then_env_then_flags_each_override_the_layer_before() {
    let file = write_file(
        r#"
listen_addr = "127.0.0.1:7000"
kafka_group = "from-file"
phase_timeout_secs = 60
bcs_url = "http://bcs.file:8080"
"#,
    );
    let env = env(&[
        ("BOS_LISTEN_ADDR", "127.0.0.1:7001"),
        ("BOS_KAFKA_GROUP", "from-env"),
        ("UNRELATED", "ignored"),
    ]);
    let flags = ConfigLayer {
        listen_addr: Some("127.0.0.1:7002".into()),
        ..Default::default()
    };
    let config = Config::load(Some(&file.0), env, flags).unwrap();
    assert_eq!(
        config.listen_addr,
        "127.0.0.1:7002".parse().unwrap(),
        "flag beats env and file"
    );
    assert_eq!(config.kafka_group, "from-env", "env beats file");
    assert_eq!(
        config.phase_timeout,
        Duration::from_secs(60),
        "file beats default"
    );
    assert_eq!(config.bcs_url.as_deref(), Some("http://bcs.file:8080"));
}

#[test]
fn empty_environment_values_count_as_unset() {
    let layer = env(&[("BOS_REDIS_URL", ""), ("BOS_LISTEN_ADDR", "")]);
    let config = Config::from_layer(layer).unwrap();
    assert_eq!(config.redis_url, None);
    assert_eq!(config.listen_addr, "127.0.0.1:50051".parse().unwrap());
}

#[test]
fn every_env_variable_reaches_its_setting() {
    let config = Config::from_layer(env(&[
        ("BOS_LISTEN_ADDR", "0.0.0.0:9000"),
        ("BOS_DATABASE_URL", "postgres://bos:pw@db:5432/bos"),
        ("BOS_KAFKA_BROKERS", "k1:9092,k2:9092"),
        ("BOS_KAFKA_GROUP", "bos-2"),
        ("BOS_REDIS_URL", "redis://127.0.0.1:6379/0"),
        ("BOS_JWT_SECRET", SECRET),
        ("BOS_INTERNAL_API_KEY", "internal-key-0123456789"),
        ("BOS_BCS_URL", "https://bcs.example:443"),
        ("BOS_PHASE_TIMEOUT_SECS", "90"),
        ("BOS_RETENTION_HOURS", "48"),
        ("BOS_STATUS_CACHE_MAX_AGE_MS", "250"),
    ]))
    .unwrap();
    assert_eq!(config.listen_addr, "0.0.0.0:9000".parse().unwrap());
    assert_eq!(
        config.database_url.expose(),
        "postgres://bos:pw@db:5432/bos"
    );
    assert!(!config.uses_sqlite());
    assert_eq!(config.kafka_brokers.as_deref(), Some("k1:9092,k2:9092"));
    assert_eq!(config.kafka_group, "bos-2");
    assert_eq!(
        config.redis_url.as_ref().map(Secret::expose),
        Some("redis://127.0.0.1:6379/0")
    );
    assert_eq!(config.jwt, JwtKey::Secret(Secret::new(SECRET)));
    assert_eq!(
        config.internal_api_key.as_ref().map(Secret::expose),
        Some("internal-key-0123456789")
    );
    assert_eq!(config.bcs_url.as_deref(), Some("https://bcs.example:443"));
    assert_eq!(config.phase_timeout, Duration::from_secs(90));
    assert_eq!(config.retention, Duration::from_secs(48 * 3600));
    assert_eq!(config.status_cache_max_age, Duration::from_millis(250));
}

#[test]
fn status_cache_max_age_defaults_to_a_second_and_zero_turns_it_off() {
    let config = Config::from_layer(env(&[])).unwrap();
    assert_eq!(config.status_cache_max_age, Duration::from_secs(1));
    let off = Config::from_layer(env(&[("BOS_STATUS_CACHE_MAX_AGE_MS", "0")])).unwrap();
    assert_eq!(off.status_cache_max_age, Duration::ZERO);
}

#[test]
fn commit_lanes_default_to_two_and_must_be_between_one_and_sixty_four() {
    assert_eq!(Config::from_layer(env(&[])).unwrap().commit_lanes, 2);
    let eight = Config::from_layer(env(&[("BOS_COMMIT_LANES", "8")])).unwrap();
    assert_eq!(eight.commit_lanes, 8);
    for bad in ["0", "65"] {
        let error = error_of(&[("BOS_COMMIT_LANES", bad)]);
        assert!(
            error.contains("BOS_COMMIT_LANES") && error.contains("out of range"),
            "{error}"
        );
    }
    let error = error_of(&[("BOS_COMMIT_LANES", "many")]);
    assert!(
        error.contains("BOS_COMMIT_LANES") && error.contains("not a whole number"),
        "{error}"
    );
}

fn error_of(pairs: &[(&str, &str)]) -> String {
    let layer = match ConfigLayer::from_env(pairs.iter().map(|(k, v)| (*k, *v))) {
        Ok(layer) => layer,
        Err(e) => return e.to_string(),
    };
    Config::from_layer(layer).unwrap_err().to_string()
}

#[test]
fn invalid_values_are_rejected_with_the_setting_named() {
    assert_eq!(
        error_of(&[("BOS_LISTEN_ADDR", "x")]),
        "BOS_LISTEN_ADDR: invalid socket address 'x'"
    );
    let cases: &[(&str, &str)] = &[
        ("BOS_DATABASE_URL", "mysql://localhost/bos"),
        ("BOS_KAFKA_BROKERS", "localhost"),
        ("BOS_KAFKA_BROKERS", "k1:9092,:9092"),
        ("BOS_KAFKA_GROUP", "has space"),
        ("BOS_REDIS_URL", "http://localhost"),
        ("BOS_JWT_SECRET", "short"),
        (
            "BOS_JWT_PUBLIC_KEY",
            "-----BEGIN PUBLIC KEY-----\nnot a key\n-----END PUBLIC KEY-----",
        ),
        ("BOS_JWT_PUBLIC_KEY", "/no/such/key.pem"),
        ("BOS_INTERNAL_API_KEY", "short"),
        ("BOS_BCS_URL", "ftp://bcs"),
        ("BOS_BCS_URL", "not a url"),
        ("BOS_PHASE_TIMEOUT_SECS", "0"),
        ("BOS_PHASE_TIMEOUT_SECS", "ten"),
        ("BOS_STATUS_CACHE_MAX_AGE_MS", "60001"),
        ("BOS_STATUS_CACHE_MAX_AGE_MS", "-1"),
        ("BOS_PHASE_TIMEOUT_SECS", "99999999"),
        ("BOS_RETENTION_HOURS", "0"),
        ("BOS_RETENTION_HOURS", "a week"),
        ("BOS_RETENTION_HOURS", "100000"),
    ];
    for (key, value) in cases {
        let message = error_of(&[(key, value)]);
        assert!(
            message.starts_with(&format!("{key}: ")),
            "{key}={value} gave {message}"
        );
    }
}

#[test]
fn jwt_secret_and_public_key_are_mutually_exclusive() {
    let message = error_of(&[
        ("BOS_JWT_SECRET", SECRET),
        ("BOS_JWT_PUBLIC_KEY", "-----BEGIN PUBLIC KEY-----"),
    ]);
    assert!(message.contains("not both"), "{message}");
}

#[test]
fn file_errors_name_the_file_and_unknown_keys_are_rejected() {
    let file = write_file("listen_adr = \"127.0.0.1:1\"\n");
    let err = Config::load(
        Some(&file.0),
        ConfigLayer::default(),
        ConfigLayer::default(),
    )
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("configuration file {}", file.0.display())
    );
    let cause = std::error::Error::source(&err).unwrap().to_string();
    assert!(cause.contains("listen_adr"), "{cause}");

    let missing = std::path::Path::new("/no/such/bos.toml");
    let err = Config::load(
        Some(missing),
        ConfigLayer::default(),
        ConfigLayer::default(),
    )
    .unwrap_err();
    assert!(matches!(err, ConfigError::ReadFile { .. }));
}

#[test]
fn invalid_values_from_the_file_are_named_by_their_setting() {
    let file = write_file("listen_addr = \"nope\"\n");
    let err = Config::load(
        Some(&file.0),
        ConfigLayer::default(),
        ConfigLayer::default(),
    )
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        "BOS_LISTEN_ADDR: invalid socket address 'nope'"
    );
}

#[test]
fn secrets_are_redacted_in_debug_and_display() {
    let config = Config::from_layer(env(&[
        ("BOS_DATABASE_URL", "postgres://bos:db-password@db:5432/bos"),
        ("BOS_REDIS_URL", "redis://:redis-password@cache:6379"),
        ("BOS_JWT_SECRET", SECRET),
        ("BOS_INTERNAL_API_KEY", "internal-key-0123456789"),
    ]))
    .unwrap();
    for printed in [format!("{config:?}"), config.to_string()] {
        for secret in [
            SECRET,
            "db-password",
            "redis-password",
            "internal-key-0123456789",
        ] {
            assert!(!printed.contains(secret), "{secret} leaked in {printed}");
        }
        assert!(
            printed.contains("postgres://bos:***@db:5432/bos"),
            "{printed}"
        );
    }
}

#[test]
fn public_key_is_accepted_as_pem_text_or_file() {
    // A P-256 public key, generated for this test only.
    let pem = "-----BEGIN PUBLIC KEY-----\n\
MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE260GuVNLNhrARNiVvVJuRAIDzO9g\n\
Bqf2Q5XpeU0q/5plBoWGAJYAQHkM2pIOC0Co2gwXhyXh1B6L+jCI06JFaw==\n\
-----END PUBLIC KEY-----\n";
    let from_text = Config::from_layer(env(&[("BOS_JWT_PUBLIC_KEY", pem)])).unwrap();
    assert_eq!(from_text.jwt, JwtKey::PublicKeyPem(pem.to_owned()));

    let file = write_file(pem);
    let path = file.0.display().to_string();
    let from_file = Config::from_layer(env(&[("BOS_JWT_PUBLIC_KEY", &path)])).unwrap();
    assert_eq!(from_file.jwt, JwtKey::PublicKeyPem(pem.to_owned()));
}

#[test]
fn redact_url_only_touches_passwords() {
    assert_eq!(redact_url("postgres://u:p@h/db"), "postgres://u:***@h/db");
    assert_eq!(redact_url("postgres://u@h/db"), "postgres://u@h/db");
    assert_eq!(redact_url("sqlite::memory:"), "sqlite::memory:");
}
