//! The OpenAPI 3.0 document, served at `/api/openapi.json`, written from the route table:
//! each route's own operation, plus the error responses every route of its kind can give
//! (401 behind a token, 400, 408 and 413 with a body, 400 with path parameters, 507, 429 and
//! 403 for a change), and the shared schemas.

use serde_json::{json, Map, Value};

use super::router::{Access, Table};

/// An operation: its summary, its success status and schema, the errors of its own (beyond
/// those every route of its kind has) and any other fields (`parameters`, `requestBody`).
pub fn op(summary: &str, ok: (&str, Value), errors: &[&str], extra: Value) -> Value {
    let mut responses = Map::new();
    for code in errors {
        responses.insert(code.to_string(), error_response());
    }
    responses.insert(
        ok.0.to_string(),
        json!({"description": "success", "content": {"application/json": {"schema": ok.1}}}),
    );
    let mut o = json!({"summary": summary, "responses": responses});
    if let Value::Object(extra) = extra {
        for (k, v) in extra {
            o[k] = v;
        }
    }
    o
}

/// An operation whose success is not JSON (`content_type`: text, HTML, script).
pub fn op_text(summary: &str, content_type: &str, errors: &[&str]) -> Value {
    let mut responses = Map::new();
    for code in errors {
        responses.insert(code.to_string(), error_response());
    }
    responses.insert(
        "200".into(),
        json!({"description": "success", "content": {content_type: {"schema": {"type": "string"}}}}),
    );
    json!({"summary": summary, "responses": responses})
}

fn error_response() -> Value {
    json!({"description": "error", "content": {"application/json": {"schema": schema("Error")}}})
}

/// A reference to a shared schema.
pub fn schema(name: &str) -> Value {
    json!({"$ref": format!("#/components/schemas/{name}")})
}

/// The `{id}` parameter: a function's id or name.
/// The `Idempotency-Key` header of a submission.
pub fn idempotency_param() -> Value {
    json!({
        "name": "Idempotency-Key",
        "in": "header",
        "description": "Sent again with the same key, a submission gets what the first made (header Idempotent-Replayed: true); the same key with another payload is refused (422)",
        "schema": {"type": "string", "minLength": 1, "maxLength": 255},
    })
}

pub fn id_param() -> Value {
    json!({"name": "id", "in": "path", "required": true, "description": "function id or name (name@version where a version may be named)", "example": "hello_fn", "schema": {"type": "string", "minLength": 1, "maxLength": 80}})
}

/// A task id path parameter called `name`.
pub fn task_param(name: &str) -> Value {
    json!({"name": name, "in": "path", "required": true, "schema": {"type": "string", "minLength": 1, "maxLength": 80}})
}

/// The `?version=` query parameter.
pub fn version_param() -> Value {
    json!({"name": "version", "in": "query", "schema": {"type": "integer", "minimum": 1}})
}

/// The time range parameters of metrics.
pub fn range_params() -> Vec<Value> {
    vec![
        json!({"name": "since", "in": "query", "schema": {"type": "integer", "format": "int64", "minimum": 0, "maximum": 253402300799999i64}, "description": "Unix milliseconds"}),
        json!({"name": "until", "in": "query", "schema": {"type": "integer", "format": "int64", "minimum": 1, "maximum": 253402300799999i64}, "description": "Unix milliseconds"}),
        json!({"name": "range", "in": "query", "schema": {"type": "string", "pattern": "^[0-9]{1,6}[smhd]$"}, "description": "15m, 1h, 7d"}),
        json!({"name": "step", "in": "query", "schema": {"type": "string", "pattern": "^[0-9]{1,6}[smhd]$"}, "description": "width of each point of the series: a whole number of minutes (1m, 5m, 1h, 1d); by default one giving at most 360 points"}),
    ]
}

/// `{id}` and the range parameters.
pub fn id_and_range() -> Value {
    let mut params = vec![id_param()];
    params.extend(range_params());
    Value::Array(params)
}

/// An optional JSON request body of schema `s`.
pub fn json_body(s: Value) -> Value {
    json!({"required": false, "content": {"application/json": {"schema": s}}})
}

/// The settings a deploy may give, as form fields (every one a string on the wire).
pub fn settings_properties() -> Value {
    json!({
        "name": {"type": "string", "pattern": "^[a-z0-9_-]{1,64}$"},
        "runtime": {"type": "string", "enum": ["python", "node"]},
        "handler": {"type": "string"},
        "timeout": {"type": "number", "description": "seconds"},
        "timeout_ms": {"type": "integer"},
        "memory": {"type": "integer", "description": "MiB (also memory_mb, memory_limit_mb)"},
        "cpu": {"type": "integer", "description": "millicores (also cpu_millicores)"},
        "env": {"type": "string", "description": "a JSON object of strings"},
        "max_retries": {"type": "integer"},
        "isolation": {"type": "string", "enum": ["container", "gvisor"]},
        "keep_warm": {"type": "integer", "description": "seconds"},
        "min_instances": {"type": "integer"},
        "max_instances": {"type": "integer"},
        "on_success": {"type": "string", "description": "where an async run's result goes: a function, or chain:NAME (empty: nowhere)"},
        "on_failure": {"type": "string", "description": "where an async run's error record goes: a function, or chain:NAME"}
    })
}

fn components() -> Value {
    let mut c = json!({
        "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}},
        "schemas": {
            "Error": {"type": "object", "required": ["error"], "properties": {"error": {"type": "object", "required": ["code", "message"], "properties": {"code": {"type": "string"}, "message": {"type": "string"}}}}},
            "Function": {"type": "object", "required": ["id", "name", "version", "status"], "properties": {
                "id": {"type": "string"}, "name": {"type": "string"}, "version": {"type": "integer"},
                "status": {"type": "string", "enum": ["active", "inactive"]}, "active": {"type": "boolean"},
                "created_at": {"type": "integer"}, "updated_at": {"type": "integer"},
                "settings": {"type": "object"}, "versions": {"type": "array", "items": {"type": "object"}}
            }},
            "FunctionList": {"type": "object", "required": ["functions"], "properties": {"functions": {"type": "array", "items": schema("Function")}, "count": {"type": "integer"}}},
            "Versions": {"type": "object", "required": ["id", "name", "versions"], "properties": {"id": {"type": "string"}, "name": {"type": "string"}, "versions": {"type": "array", "items": {"type": "object"}}}},
            "Changed": {"type": "object", "required": ["id", "name", "status"], "properties": {"id": {"type": "string"}, "name": {"type": "string"}, "status": {"type": "string"}}},
            "Deployed": {"type": "object", "required": ["id", "name", "version", "status"], "properties": {"id": {"type": "string"}, "name": {"type": "string"}, "version": {"type": "integer"}, "status": {"type": "string"}, "runtime": {"type": "string"}, "isolation": {"type": "string", "enum": ["container", "gvisor"]}}},
            "Queued": {"type": "object", "required": ["task_id", "status"], "properties": {"task_id": {"type": "string"}, "status": {"type": "string"}, "function": {"type": "string"}, "version": {"type": "integer"}}},
            "Task": {"type": "object", "required": ["task_id", "status", "function", "version"], "properties": {
                "task_id": {"type": "string"}, "function_id": {"type": "string"}, "function": {"type": "string"}, "version": {"type": "integer"},
                "mode": {"type": "string", "enum": ["sync", "async"]},
                "status": {"type": "string", "enum": ["queued", "running", "succeeded", "failed", "timeout", "out_of_memory", "crashed"]},
                "payload": {}, "result": {}, "error": {"type": "object"}, "logs": {"type": "string"}, "logs_truncated": {"type": "boolean"},
                "usage": {"type": "object"}, "attempts": {"type": "integer"},
                "created_at": {"type": "integer"}, "started_at": {"type": "integer"}, "finished_at": {"type": "integer"}
            }},
            "TaskList": {"type": "object", "required": ["tasks"], "properties": {"tasks": {"type": "array", "items": schema("Task")}}},
            "Metrics": {"type": "object", "required": ["invocations", "errors", "error_rate", "duration_ms", "since", "until", "step_ms", "series"], "properties": {
                "invocations": {"type": "integer"}, "errors": {"type": "integer"}, "error_rate": {"type": "number"},
                "errors_by_kind": {"type": "object", "additionalProperties": {"type": "integer"}},
                "cold_starts": {"type": "integer"}, "warm_starts": {"type": "integer"},
                "duration_ms": {"type": "object", "description": "avg, p50, p95, p99 (from a histogram, within 20 %) and max"},
                "since": {"type": "integer", "description": "start of the first step"}, "until": {"type": "integer"},
                "step_ms": {"type": "integer"}, "resolution_ms": {"type": "integer", "description": "the rollup read: minute, hour or day"},
                "series": {"type": "object", "required": ["t", "invocations", "errors"], "description": "one array per figure, aligned with t (each step's start, Unix ms)", "additionalProperties": {"type": "array", "items": {"type": "number"}}}
            }},
            "TaskLogs": {"type": "object", "required": ["task_id", "status", "logs", "logs_truncated"], "properties": {"task_id": {"type": "string"}, "function": {"type": "string"}, "version": {"type": "integer"}, "status": {"type": "string"}, "logs": {"type": "string"}, "logs_truncated": {"type": "boolean"}}},
            "Health": {"type": "object", "required": ["status"], "properties": {"status": {"type": "string"}, "queue_depth": {"type": "integer"}, "uptime_s": {"type": "number"},
                "pool": {"type": "object"}, "host": {"type": "object", "description": "CPU count, load, CPU busy % since the last health read, memory"}, "process": {"type": "object", "description": "the server's own resident memory, threads, and the async runtime's threads (runtime_threads)"}, "isolation": {"type": "object", "description": "The default isolation level, and per level whether it is available and on which runtime"}}},
            "AnomalyEvent": {"type": "object", "required": ["id", "function_id", "series", "started", "peak_score", "points"], "properties": {
                "id": {"type": "string"}, "tenant": {"type": "string"}, "function_id": {"type": "string", "description": "empty for the system's series"}, "function": {"type": "string"},
                "series": {"type": "string", "enum": ["invocations", "error_rate", "duration_p95", "cold_ratio", "peak_memory", "calls", "queue_depth"]},
                "started": {"type": "integer", "description": "the first anomalous minute, Unix ms"}, "ended": {"type": "integer", "nullable": true, "description": "null while it lasts"},
                "peak_score": {"type": "number"}, "peak_at": {"type": "integer"},
                "points": {"type": "array", "description": "minutes around it: some before, then each while it lasted", "items": {"type": "object", "properties": {"minute": {"type": "integer"}, "value": {"type": "number"}, "score": {"type": "number"}}}}
            }},
            "AnomalySeries": {"type": "object", "properties": {"series": {"type": "string"}, "status": {"type": "string", "enum": ["learning", "watching"]}, "points_seen": {"type": "integer"}, "points_needed": {"type": "integer"}, "last": {}, "open_event": {"type": "string", "nullable": true}}},
            "Anomalies": {"type": "object", "required": ["function", "status", "threshold", "series", "events", "points"], "properties": {
                "function": {"type": "string"}, "function_id": {"type": "string"},
                "status": {"type": "string", "enum": ["no_data", "learning", "watching"], "description": "no_data and learning: too little data to score yet (message says how much)"},
                "message": {"type": "string"}, "threshold": {"type": "number"}, "watched_through": {"type": "integer", "nullable": true}, "open": {"type": "integer"},
                "series": {"type": "array", "items": schema("AnomalySeries")},
                "events": {"type": "array", "items": schema("AnomalyEvent")},
                "points": {"type": "object", "description": "per series, its scored minutes as [minute, value, score]", "additionalProperties": {"type": "array"}}
            }},
            "SystemAnomalies": {"type": "object", "required": ["threshold", "events"], "properties": {
                "threshold": {"type": "number"}, "watched_through": {"type": "integer", "nullable": true}, "points_needed": {"type": "integer"}, "open": {"type": "integer"},
                "series": {"description": "the system's series (admins only; null otherwise)"},
                "events": {"type": "array", "items": schema("AnomalyEvent")}
            }},
            "Outcome": {"type": "object", "required": ["task_id", "status"], "properties": {"output": {}, "error": {}, "task_id": {"type": "string"}, "status": {"type": "string"}}}
        }
    });
    if let (Some(schemas), Value::Object(more)) = (c["schemas"].as_object_mut(), alerting_schemas())
    {
        schemas.extend(more);
    }
    for more in [super::chains::schemas(), super::secrets::schemas()] {
        if let (Some(schemas), Value::Object(more)) = (c["schemas"].as_object_mut(), more) {
            schemas.extend(more);
        }
    }
    c
}

/// Alerting's schemas (a macro call of their own: one would be too deep).
fn alerting_schemas() -> Value {
    json!({
            "AlertRuleSpec": {"type": "object", "required": ["name", "metric", "op", "threshold"], "properties": {
                "name": {"type": "string", "minLength": 1, "maxLength": 100},
                "function": {"type": "string", "description": "a function's name or id; absent: every function of the tenant (or the system, for queue metrics)"},
                "metric": {"type": "string", "enum": ["error_rate", "errors", "duration_p50_ms", "duration_p95_ms", "duration_p99_ms", "cold_ratio", "invocations", "throttled", "anomaly_score", "queue_depth", "queue_age_s"]},
                "error_kind": {"type": "string", "description": "with errors: only this kind (timeout, out_of_memory, crashed, ...)"},
                "op": {"type": "string", "enum": ["above", "below"]}, "threshold": {"type": "number", "minimum": 0},
                "for_s": {"type": "integer", "minimum": 0, "maximum": 604800, "description": "how long the condition must hold before firing"},
                "severity": {"type": "string", "enum": ["info", "warning", "critical"]},
                "renotify_s": {"type": "integer", "minimum": 0, "maximum": 604800}
            }},
            "AlertRule": {"type": "object", "required": ["id", "name", "metric", "state"], "properties": {
                "id": {"type": "string"}, "tenant": {"type": "string"}, "name": {"type": "string"}, "metric": {"type": "string"}, "op": {"type": "string"}, "threshold": {"type": "number"},
                "state": {"type": "string", "enum": ["ok", "pending", "firing"]}, "firing": {"type": "array", "items": {"type": "string"}}, "pending": {"type": "array", "items": {"type": "string"}},
                "silenced": {"type": "boolean"}, "silenced_until": {"type": "integer", "nullable": true}
            }},
            "SubscriptionSpec": {"type": "object", "required": ["channel"], "properties": {
                "channel": {"type": "string", "enum": ["webhook", "email", "sms"]},
                "url": {"type": "string", "description": "webhook: http(s) URL"}, "format": {"type": "string", "enum": ["cloudfunc", "alertmanager"]},
                "address": {"type": "string", "description": "email"}, "number": {"type": "string", "description": "sms: E.164, like +14155550123"},
                "alerts": {"type": "object", "properties": {"rule": {"type": "string"}, "function": {"type": "string"}, "system_events": {"type": "boolean"}}},
                "min_severity": {"type": "string", "enum": ["info", "warning", "critical"]}
            }},
            "Subscription": {"type": "object", "properties": {"id": {"type": "string"}, "tenant": {"type": "string"}, "channel": {"type": "string"}, "created_at": {"type": "integer"}}},
            "Subscribed": {"type": "object", "required": ["status", "subscription_id"], "properties": {"status": {"type": "string"}, "subscription_id": {"type": "string"}, "secret": {"type": "string", "description": "webhooks only, shown once"}, "subscription": schema("Subscription")}},
            "Delivery": {"type": "object", "properties": {"id": {"type": "string"}, "notification_id": {"type": "string"}, "channel": {"type": "string"}, "target": {"type": "string"},
                "status": {"type": "string", "enum": ["pending", "sent", "failed"]}, "attempts": {"type": "integer"}, "last_error": {"type": "string", "nullable": true}, "summary": {"type": "string"}}},
            "Notification": {"type": "object", "description": "the body of a cloudfunc webhook", "required": ["id", "type", "status", "summary", "items", "at"], "properties": {
                "id": {"type": "string"}, "type": {"type": "string", "enum": ["alert.firing", "alert.resolved", "system.event"]}, "status": {"type": "string"},
                "severity": {"type": "string"}, "rule_id": {"type": "string", "nullable": true}, "rule": {"type": "string", "nullable": true}, "condition": {"type": "string"}, "summary": {"type": "string"},
                "items": {"type": "array", "items": {"type": "object", "properties": {"function": {"type": "string"}, "function_id": {"type": "string"}, "value": {"type": "number"}, "since": {"type": "integer"}}}},
                "at": {"type": "integer"}, "dashboard": {"type": "string"}
            }}
    })
}

/// The document of every route in `table`.
pub fn document(table: &Table) -> Value {
    let mut paths = Map::new();
    for route in table.routes() {
        let mut op = (route.doc)();
        let responses = op["responses"]
            .as_object_mut()
            .expect("every operation has responses");
        let mut common = Vec::new();
        if route.access == Access::Token {
            // 503: the database is unavailable for now (with Retry-After).
            common.extend(["401", "503"]);
        }
        if route.body {
            // 408: the body did not arrive in time.
            common.extend(["400", "408", "413"]);
        }
        if route.access == Access::Token && route.method != warp::http::Method::GET {
            // A change the disk has no room for (or a floor it is below) is refused; a
            // tenant over its invocation or deploy rate is told when to come back, and one
            // at its cap on functions or code is refused.
            common.extend(["507", "429", "403"]);
        }
        if route.path.contains('{') {
            // A path segment that is not UTF-8 once percent-decoded.
            common.push("400");
        }
        for code in common {
            responses.entry(code).or_insert_with(error_response);
        }
        if route.access == Access::Public {
            op["security"] = json!([]);
        }
        let item = paths
            .entry(route.path.to_string())
            .or_insert_with(|| json!({}));
        item[route.method.as_str().to_lowercase()] = op;
    }
    json!({
        "openapi": "3.0.3",
        "info": {"title": "cloudfunc", "version": env!("CARGO_PKG_VERSION"), "description": "Deploy and run Python and JavaScript functions in sandboxes. Every route but health, this document and the dashboard's files needs 'Authorization: Bearer <JWT>'."},
        "components": components(),
        "security": [{"bearer": []}],
        "paths": paths,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_route_is_documented_once_with_responses() {
        let table = crate::api::table();
        let doc = document(&table);
        let paths = doc["paths"].as_object().unwrap();
        let mut documented = 0;
        for (path, item) in paths {
            for (method, op) in item.as_object().unwrap() {
                documented += 1;
                let responses = op["responses"].as_object().unwrap();
                assert!(
                    responses.keys().any(|k| k.starts_with('2')),
                    "{method} {path} has no success response"
                );
                assert!(op["summary"].is_string(), "{method} {path}");
            }
        }
        assert_eq!(documented, table.routes().count());
        // Every `$ref` points at a schema that exists.
        let text = doc.to_string();
        for piece in text.split("#/components/schemas/").skip(1) {
            let name: String = piece.chars().take_while(|c| c.is_alphanumeric()).collect();
            assert!(doc["components"]["schemas"][&name].is_object(), "{name}");
        }
    }
}
