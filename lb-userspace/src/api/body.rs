//! Request bodies: JSON objects, turned into the typed values the owner task applies. The
//! tables of `POST /v1/services` and `POST /v1/services/{name}/backends` go through the config
//! file's own validators ([`ServiceCfg::from_table`], [`BackendCfg::from_table`]).

use std::net::IpAddr;

use serde_json::Value;

use super::ApiError;
use crate::config::{AdminState, BackendCfg, ServiceCfg, MAX_WEIGHT};

/// JSON → TOML value, refusing what TOML cannot express.
fn to_toml(v: &Value, field: &str) -> Result<toml::Value, ApiError> {
    Ok(match v {
        Value::Null => {
            return Err(ApiError::bad_request(format!(
                "{field}: null is not allowed"
            )))
        }
        Value::Bool(b) => toml::Value::Boolean(*b),
        Value::Number(n) => match (n.as_i64(), n.as_f64()) {
            (Some(i), _) => toml::Value::Integer(i),
            (None, Some(f)) if n.is_f64() => toml::Value::Float(f),
            _ => {
                return Err(ApiError::bad_request(format!(
                    "{field}: {n} is out of range"
                )))
            }
        },
        Value::String(s) => toml::Value::String(s.clone()),
        Value::Array(a) => toml::Value::Array(
            a.iter()
                .enumerate()
                .map(|(i, x)| to_toml(x, &format!("{field}[{i}]")))
                .collect::<Result<_, _>>()?,
        ),
        Value::Object(o) => toml::Value::Table(table(o, field)?),
    })
}

fn table(o: &serde_json::Map<String, Value>, field: &str) -> Result<toml::Table, ApiError> {
    o.iter()
        .map(|(k, v)| {
            let name = if field.is_empty() {
                k.clone()
            } else {
                format!("{field}.{k}")
            };
            Ok((k.clone(), to_toml(v, &name)?))
        })
        .collect()
}

/// Body of `POST /v1/services`: a `[[service]]` table (`backends` may replace `backend`).
pub fn service(body: &[u8]) -> Result<ServiceCfg, ApiError> {
    let mut o = json_object(body)?;
    if let Some(b) = o.remove("backends") {
        if o.contains_key("backend") {
            return Err(ApiError::bad_request(
                "backends: give either \"backends\" or \"backend\", not both",
            ));
        }
        o.insert("backend".into(), b);
    }
    Ok(ServiceCfg::from_table(&table(&o, "")?)?)
}

/// Body of `POST /v1/services/{service}/backends`: a `[[service.backend]]` table.
pub fn backend(service: &str, body: &[u8]) -> Result<BackendCfg, ApiError> {
    Ok(BackendCfg::from_table(
        service,
        &table(&json_object(body)?, "")?,
    )?)
}

/// `POST /v1/stop`: `{}` or `{"detach": true|false}` (an empty body means `{}`).
pub fn stop(body: &[u8]) -> Result<bool, ApiError> {
    if body.is_empty() {
        return Ok(false);
    }
    match json_object(body)?.get("detach") {
        None => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(v) => Err(ApiError::bad_request(format!(
            "detach: expected true or false, got {}",
            kind(v)
        ))),
    }
}

fn json_object(body: &[u8]) -> Result<serde_json::Map<String, Value>, ApiError> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("body: malformed JSON: {e}")))?;
    match v {
        Value::Object(o) => Ok(o),
        other => Err(ApiError::bad_request(format!(
            "body: expected a JSON object, got {}",
            kind(&other)
        ))),
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

pub fn parse_addr(s: &str) -> Result<IpAddr, ApiError> {
    s.parse()
        .map_err(|_| ApiError::bad_request(format!("address: invalid IP address {s:?}")))
}

/// Body of `PATCH .../backends/{addr}`.
pub fn parse_set(body: &[u8]) -> Result<(Option<u32>, Option<AdminState>), ApiError> {
    let o = json_object(body)?;
    let mut weight = None;
    let mut state = None;
    for (k, v) in &o {
        match k.as_str() {
            "weight" => {
                let w = match v {
                    Value::Number(n) if n.as_i64().is_some() => n.as_i64().unwrap_or(-1),
                    Value::Number(n) if n.as_u64().is_some() => i64::MAX,
                    other => {
                        return Err(ApiError::bad_request(format!(
                            "weight: expected an integer, got {}",
                            kind(other)
                        )))
                    }
                };
                if !(0..=MAX_WEIGHT as i64).contains(&w) {
                    return Err(ApiError::bad_request(format!(
                        "weight: {v} is out of range 0..={MAX_WEIGHT}"
                    )));
                }
                weight = Some(w as u32);
            }
            "state" => {
                let s = v.as_str().ok_or_else(|| {
                    ApiError::bad_request(format!("state: expected a string, got {}", kind(v)))
                })?;
                state = Some(
                    s.parse::<AdminState>()
                        .map_err(|e| ApiError::bad_request(format!("state: {e}")))?,
                );
            }
            other => {
                return Err(ApiError::bad_request(format!(
                    "unknown field {other:?}, expected \"weight\" or \"state\""
                )))
            }
        }
    }
    if weight.is_none() && state.is_none() {
        return Err(ApiError::bad_request(
            "body: expected \"weight\" and/or \"state\"",
        ));
    }
    Ok((weight, state))
}

#[cfg(test)]
mod tests {
    use axum::http::StatusCode;
    use serde_json::json;

    use super::*;
    use crate::config::Config;

    /// Service "web" with a tcp check every 200 ms and two backends, the second with its own.
    const RUNNING: &str = "interface = \"eth0\"\n[[service]]\nname = \"web\"\n\
        vip = \"10.0.0.1\"\nport = 80\ntable_size = 7\n\
        check = { type = \"tcp\", interval = \"200ms\" }\n\
        backend = [{ address = \"10.0.0.11\" }, { address = \"10.0.0.12\", weight = 3, \
        state = \"drain\", check = { type = \"http\", path = \"/health\" } }]\n";

    /// What the owner task does with `POST /v1/services/{service}/backends`.
    fn add_backend(running: &Config, service: &str, v: Value) -> Result<Config, ApiError> {
        let b = backend(service, v.to_string().as_bytes())?;
        Ok(running.with_backend(service, b)?)
    }

    /// What the owner task does with `POST /v1/services`.
    fn add_service(running: &Config, v: Value) -> Result<Config, ApiError> {
        Ok(running.with_service(service(v.to_string().as_bytes())?)?)
    }

    #[test]
    fn add_and_remove_through_the_config_rules() {
        let running = Config::from_toml_str(RUNNING).unwrap();
        let c = add_backend(
            &running,
            "web",
            json!({"address": "10.0.0.13", "weight": 2}),
        )
        .unwrap();
        assert_eq!(c.services[0].backends.len(), 3);
        assert_eq!(c.services[0].backends[2].weight, 2);
        // The new backend inherits the service's check.
        assert_eq!(
            c.services[0].backends[2].check,
            c.services[0].backends[0].check
        );
        assert!(c.services[0].backends[0].check.is_some());
        let c = add_service(
            &c,
            json!({
                "name": "api", "vip": "10.0.0.2", "port": 81,
                "backends": [{"address": "10.0.0.21"}],
            }),
        )
        .unwrap();
        assert_eq!(c.services.len(), 2);
        assert_eq!(c.services[1].backends.len(), 1);
        let c = c
            .without_backend("web", "10.0.0.11".parse().unwrap())
            .unwrap();
        assert_eq!(c.services[0].backends.len(), 2);
        let c = c.without_service("api").unwrap();
        assert_eq!(c.services.len(), 1);
    }

    #[test]
    fn invalid_requests_name_the_field() {
        let running = Config::from_toml_str(RUNNING).unwrap();
        let e = add_backend(&running, "web", json!({"address": "10.0.0.x"})).unwrap_err();
        assert_eq!(e.status(), StatusCode::BAD_REQUEST);
        assert_eq!(
            e.message,
            "service \"web\": backend.address: invalid IP address \"10.0.0.x\""
        );
        let e = add_backend(
            &running,
            "web",
            json!({"address": "10.0.0.13", "weight": -1}),
        )
        .unwrap_err();
        assert!(
            e.message.ends_with("weight: -1 is out of range 0..=65535"),
            "{e:?}"
        );
        let e = add_backend(&running, "web", json!({"address": "10.0.0.11"})).unwrap_err();
        assert_eq!(e.status(), StatusCode::CONFLICT, "{e:?}");
        let e = add_backend(&running, "nope", json!({"address": "10.0.0.13"})).unwrap_err();
        assert_eq!(e.status(), StatusCode::NOT_FOUND);
        let e = add_service(
            &running,
            json!({"name": "web2", "vip": "10.0.0.1", "port": 80}),
        )
        .unwrap_err();
        assert_eq!(e.status(), StatusCode::CONFLICT, "{e:?}");
        let e = add_service(
            &running,
            json!({"name": "x", "vip": "10.0.0.5", "prot": 80}),
        )
        .unwrap_err();
        assert!(e.message.contains("unknown field \"prot\""), "{e:?}");
        let e = add_service(&running, json!({"name": "x", "vip": null, "port": 80})).unwrap_err();
        assert_eq!(e.message, "vip: null is not allowed");
        let e = add_service(
            &running,
            json!({"name": "x", "vip": "10.0.0.5", "port": 1, "backend": [], "backends": []}),
        )
        .unwrap_err();
        assert!(e.message.starts_with("backends: give either"), "{e:?}");
        let e = add_service(
            &running,
            json!({"name": "x", "vip": "10.0.0.5", "port": 1.5}),
        )
        .unwrap_err();
        assert_eq!(
            e.message,
            "port: invalid type: floating point 1.5, expected an integer"
        );
        assert!(running.without_service("nope").is_err());
        let e = running
            .without_backend("web", "10.0.0.99".parse().unwrap())
            .unwrap_err();
        assert_eq!(ApiError::from(e).status(), StatusCode::NOT_FOUND);
    }

    #[test]
    fn set_bodies() {
        assert_eq!(parse_set(br#"{"weight": 5}"#).unwrap(), (Some(5), None));
        assert_eq!(
            parse_set(br#"{"state": "drain", "weight": 0}"#).unwrap(),
            (Some(0), Some(AdminState::Drain))
        );
        for (body, want) in [
            (
                &br#"{"weight": -1}"#[..],
                "weight: -1 is out of range 0..=65535",
            ),
            (
                br#"{"weight": 65536}"#,
                "weight: 65536 is out of range 0..=65535",
            ),
            (
                br#"{"weight": 1.5}"#,
                "weight: expected an integer, got a number",
            ),
            (
                br#"{"weight": "2"}"#,
                "weight: expected an integer, got a string",
            ),
            (
                br#"{"state": "up"}"#,
                "state: invalid value \"up\", expected \"ready\", \"drain\" or \"maint\"",
            ),
            (
                br#"{"wieght": 1}"#,
                "unknown field \"wieght\", expected \"weight\" or \"state\"",
            ),
            (br#"{}"#, "body: expected \"weight\" and/or \"state\""),
            (br#"[1]"#, "body: expected a JSON object, got an array"),
        ] {
            assert_eq!(parse_set(body).unwrap_err().message, want);
        }
        let e = parse_set(b"{\"weight\": ").unwrap_err();
        assert!(e.message.starts_with("body: malformed JSON: "), "{e:?}");
        assert_eq!(e.status(), StatusCode::BAD_REQUEST);
        assert!(parse_addr("10.0.0.1").is_ok());
        assert_eq!(
            parse_addr("10.0.0.x").unwrap_err().message,
            "address: invalid IP address \"10.0.0.x\""
        );
    }
}
