//! RS256 and ES256 verification with a PEM public key (`BOS_JWT_PUBLIC_KEY`). The key pairs below were generated
//! for this test only (openssl, throwaway) and protect nothing.

use bos::api::auth::{mint_token, AuthError, Authenticator};
use bos::config::JwtKey;
use jsonwebtoken::{Algorithm, EncodingKey, Header};

const EC_PRIVATE: &str = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgBg+bM6hwcv9PK9jx
sGfb4onipFsVr5EFRwUGu6Z/d5KhRANCAAQsldeZ7OB9pMh0faJeijNY2L/DCzC7
FFWgjd5a3iPv7LOMAx0iB38S6K9FTP9CGeB2yjjN2S2I8l3il94SC5sN
-----END PRIVATE KEY-----\n";
const EC_PUBLIC: &str = "-----BEGIN PUBLIC KEY-----
MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAELJXXmezgfaTIdH2iXoozWNi/wwsw
uxRVoI3eWt4j7+yzjAMdIgd/EuivRUz/Qhngdso4zdktiPJd4pfeEgubDQ==
-----END PUBLIC KEY-----\n";
const RSA_PRIVATE: &str = "-----BEGIN PRIVATE KEY-----
MIIEvgIBADANBgkqhkiG9w0BAQEFAASCBKgwggSkAgEAAoIBAQDQjmu3qOAZipcp
vHe5GZpLm3Ca+KUebQSnZ+NbdRk9nehAADXktDtAaL9n1UA5ezRXaUgFMwFC1lYm
PAQ2zdq/MlDsMqu+zBAYA+TU3Gk6dz/D+EAgAvfacxCGyMq4MSyzQeXQUHC8POSU
Q5+ZNM9cqtgLAxdt/txZprrTTTdwloDS3eqrVqUGb153QxLz9u0PQNXGumv5g9Un
DGbtOyo0YGygGORLDeJ1MyTI1Pc1kosdybJqQ9adbUhnODU1p96uEHPixgNzRjI8
AM99P/ARMnaE9aIBOexmwc5LO3qxZGDjcNh+EHkjJdT7xmQGbLO6iDY2YPmZp/7n
ntYCvzqnAgMBAAECggEALRAA3VOrbEliRR3YXpHWIW0KJSoBf3P90/AiE4JXPFWQ
t7dz7aE1xkJ7zQMqV+Ezm4l/isQNCzSFs8g2/uJ21+YWzxpZuqWb+pxoxseDIyNe
D0lmDaSmijhfg0gCaU8Swf7EmcCvwzSDDTgZVYCwJ20wthxqZRVy5hoc9wgRqQ0w
GFw4082MuF4SVcVXDsMvKLLYieWE79HZ+/JE7BzYsJt/RHlczIQDIskoi1locebm
/2IbdlvDdcZgWVepNgtz2RE5vuoWdnKs5SlZFf36RyTPPghzedLukoJ8B5IUKYug
9KqY1UuHA6ONW/aBpJaXRA8Bz4nR6hpLCc8sBNikOQKBgQDpDpFx7w908soQL2E2
31s5rTrOk7cBrznDl/K+Qu/nWjsQcQ4FhmYxTLxWLPc+I1R6XCmCGLrLD8PMHOfn
dLItFvvXwh8km5eZDXtVqSgJ4mR+Pohen5n2UCfJ6OkV41IJAJZ/Co3l/ncNbrdy
1T/PQ4IC6c1jSD3xMKM4P5harwKBgQDlFmVz4YWcv3L2cL7V9YbnInWohuxngk8r
lioRQqCTsygHZ8UzLb+gCpopnZyNxtuoPVgBFtJLFJNT/50CeKk5SWVjRv1+4aQI
ysKTnHudc3S38h1LAWdnmp5YoPGUVLuaVAOavlbdUPJWtst/oWuXVuvFpLc2LZ17
9uLsl9U9iQKBgQDm4WzLX1aDuCbfw+Bd+QYp7Ghu0D2jqJDkKTrsq+l425XZ4vZO
GOhSfL+z65YAdAWztmvUm2Up1/NT2WsQjDYbn0Jda81oec/Ea2u83/hvWl3OB2sX
uqtPLfdM+rU23t2dV3zAXJdYuy/8GawZUhOF5E3/TtoPOjlLILEB/1aStwKBgHqs
MYuKGlhDlLYuzaIZJjIjG8ow5erPtsFqWgCAIyi0aRz+DnVHbDOxObhLNAgfkoRW
xQdgRx/5VqNGX7dxEX0htm8hFqGZBpPGr8cHppI7vya5OcJucAbknyJqnLKHZSZR
EtUMU8uTixGwNOyVbd3Op9ZgS9NxPcGiBQYYkBGxAoGBAKGfFQNQLH5LSI3kH2pc
PepdbyA9d7k7yA0c7oAJsmeddSqvXUg63jQNKbvlw+EIFFoU2MgfxiCoZQnzPZq6
aXlVOyP03WjFNEO9TPNu1WOpgbXQpkaJbicJ56p1KVQEfHn+sgc0uzu/ZipNrhyq
1VN/PtwwIvdAUszr8On4RAcn
-----END PRIVATE KEY-----\n";
const RSA_PUBLIC: &str = "-----BEGIN PUBLIC KEY-----
MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEA0I5rt6jgGYqXKbx3uRma
S5twmvilHm0Ep2fjW3UZPZ3oQAA15LQ7QGi/Z9VAOXs0V2lIBTMBQtZWJjwENs3a
vzJQ7DKrvswQGAPk1NxpOnc/w/hAIAL32nMQhsjKuDEss0Hl0FBwvDzklEOfmTTP
XKrYCwMXbf7cWaa60003cJaA0t3qq1alBm9ed0MS8/btD0DVxrpr+YPVJwxm7Tsq
NGBsoBjkSw3idTMkyNT3NZKLHcmyakPWnW1IZzg1NaferhBz4sYDc0YyPADPfT/w
ETJ2hPWiATnsZsHOSzt6sWRg43DYfhB5IyXU+8ZkBmyzuog2NmD5maf+557WAr86
pwIDAQAB
-----END PUBLIC KEY-----\n";

#[derive(serde::Serialize)]
struct Claims {
    sub: &'static str,
    org_id: &'static str,
    exp: u64,
}

fn token(algorithm: Algorithm, key: &EncodingKey) -> String {
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 600;
    jsonwebtoken::encode(
        &Header::new(algorithm),
        &Claims {
            sub: "grace",
            org_id: "org-7",
            exp,
        },
        key,
    )
    .unwrap()
}

#[test]
fn es256_tokens_verify_with_the_ec_public_key() {
    let auth = Authenticator::new(&JwtKey::PublicKeyPem(EC_PUBLIC.to_owned()), None).unwrap();
    let signed = token(
        Algorithm::ES256,
        &EncodingKey::from_ec_pem(EC_PRIVATE.as_bytes()).unwrap(),
    );
    let identity = auth
        .verify_bearer(Some(&format!("Bearer {signed}")))
        .unwrap();
    assert_eq!(identity.user.as_str(), "grace");
    assert_eq!(
        identity.org.map(|o| o.to_string()),
        Some("org-7".to_owned())
    );
    // An RS256 token is refused by an ES256 verifier, and so is an HS256 one.
    let rsa = token(
        Algorithm::RS256,
        &EncodingKey::from_rsa_pem(RSA_PRIVATE.as_bytes()).unwrap(),
    );
    assert!(auth.verify_bearer(Some(&format!("Bearer {rsa}"))).is_err());
    let hs = token(
        Algorithm::HS256,
        &EncodingKey::from_secret(EC_PUBLIC.as_bytes()),
    );
    assert!(auth.verify_bearer(Some(&format!("Bearer {hs}"))).is_err());
}

#[test]
fn rs256_tokens_verify_with_the_rsa_public_key() {
    let auth = Authenticator::new(&JwtKey::PublicKeyPem(RSA_PUBLIC.to_owned()), None).unwrap();
    let signed = token(
        Algorithm::RS256,
        &EncodingKey::from_rsa_pem(RSA_PRIVATE.as_bytes()).unwrap(),
    );
    assert_eq!(
        auth.verify_bearer(Some(&format!("Bearer {signed}")))
            .unwrap()
            .user
            .as_str(),
        "grace"
    );
    let ec = token(
        Algorithm::ES256,
        &EncodingKey::from_ec_pem(EC_PRIVATE.as_bytes()).unwrap(),
    );
    assert!(auth.verify_bearer(Some(&format!("Bearer {ec}"))).is_err());
}

#[test]
fn a_public_key_cannot_mint_and_garbage_is_refused() {
    assert!(matches!(
        mint_token(
            &JwtKey::PublicKeyPem(RSA_PUBLIC.to_owned()),
            "grace",
            None,
            60
        ),
        Err(AuthError::CannotMint)
    ));
    assert!(matches!(
        Authenticator::new(&JwtKey::PublicKeyPem("not a key".to_owned()), None),
        Err(AuthError::BadPublicKey)
    ));
}
