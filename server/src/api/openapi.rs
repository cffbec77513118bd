//! The OpenAPI 3.0 document for every route, served at `/api/openapi.json`.

use serde_json::{json, Map, Value};

fn error_responses(codes: &[&str]) -> Map<String, Value> {
    let mut m = Map::new();
    for code in codes {
        m.insert(code.to_string(), json!({"description": "error", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}));
    }
    m
}

fn op(summary: &str, ok: (&str, Value), errors: &[&str], extra: Value) -> Value {
    let mut responses = error_responses(errors);
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

fn id_param() -> Value {
    json!({"name": "id", "in": "path", "required": true, "description": "function id or name (name@version where a version may be named)", "example": "hello_fn", "schema": {"type": "string", "minLength": 1, "maxLength": 80}})
}

fn task_param(name: &str) -> Value {
    json!({"name": name, "in": "path", "required": true, "schema": {"type": "string", "minLength": 1, "maxLength": 80}})
}

fn range_params() -> Value {
    json!([
        {"name": "since", "in": "query", "schema": {"type": "integer", "format": "int64", "minimum": 0, "maximum": 253402300799999i64}, "description": "Unix milliseconds"},
        {"name": "until", "in": "query", "schema": {"type": "integer", "format": "int64", "minimum": 1, "maximum": 253402300799999i64}, "description": "Unix milliseconds"},
        {"name": "range", "in": "query", "schema": {"type": "string", "pattern": "^[0-9]{1,6}[smhd]$"}, "description": "15m, 1h, 7d"},
        {"name": "step", "in": "query", "schema": {"type": "string", "pattern": "^[0-9]{1,6}[smhd]$"}, "description": "width of each point of the series: a whole number of minutes (1m, 5m, 1h, 1d); by default one giving at most 360 points"}
    ])
}

fn id_and_range() -> Value {
    let mut params = vec![id_param()];
    params.extend(range_params().as_array().cloned().unwrap_or_default());
    Value::Array(params)
}

fn schema(name: &str) -> Value {
    json!({"$ref": format!("#/components/schemas/{name}")})
}

fn json_body(s: Value) -> Value {
    json!({"required": false, "content": {"application/json": {"schema": s}}})
}

fn deploy_body() -> Value {
    json!({"required": true, "content": {
        "multipart/form-data": {"schema": {"type": "object", "required": ["file"], "properties": {
            "file": {"type": "string", "format": "binary"},
            "name": {"type": "string", "pattern": "^[a-z0-9_-]{1,64}$"},
            "runtime": {"type": "string", "enum": ["python", "node"]},
            "handler": {"type": "string"},
            "timeout": {"type": "number"},
            "memory": {"type": "integer"},
            "cpu": {"type": "integer"},
            "env": {"type": "string", "description": "JSON object of strings"},
            "max_retries": {"type": "integer"},
            "isolation": {"type": "string", "enum": ["container", "gvisor"]}
        }}},
        "application/zip": {"schema": {"type": "string", "format": "binary"}}
    }})
}

fn seed002_body() -> Value {
    json!({"type": "object", "required": ["name", "code"], "properties": {
        "name": {"type": "string"}, "language": {"type": "string"}, "timeout": {"type": "number"},
        "code": {"type": "string"}, "isolation": {"type": "string", "enum": ["container", "gvisor"]}
    }})
}

/// The document.
pub fn document() -> Value {
    let four = ["400", "401", "404", "409", "413", "415", "422"];
    let any = json!({});
    json!({
        "openapi": "3.0.3",
        "info": {"title": "cloudfunc", "version": env!("CARGO_PKG_VERSION"), "description": "Deploy and run Python and JavaScript functions in sandboxes. Every route but health and this document needs 'Authorization: Bearer <JWT>'."},
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}},
            "schemas": {
                "Error": {"type": "object", "required": ["error"], "properties": {"error": {"type": "object", "required": ["code", "message"], "properties": {"code": {"type": "string"}, "message": {"type": "string"}}}}},
                "Function": {"type": "object", "required": ["id", "name", "version", "status"], "properties": {
                    "id": {"type": "string"}, "name": {"type": "string"}, "version": {"type": "integer"},
                    "status": {"type": "string", "enum": ["active", "inactive"]}, "active": {"type": "boolean"},
                    "created_at": {"type": "integer"}, "updated_at": {"type": "integer"},
                    "settings": {"type": "object"}, "versions": {"type": "array", "items": {"type": "object"}}
                }},
                "FunctionList": {"type": "object", "required": ["functions"], "properties": {"functions": {"type": "array", "items": {"$ref": "#/components/schemas/Function"}}, "count": {"type": "integer"}}},
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
                    "pool": {"type": "object"}, "host": {"type": "object", "description": "CPU count, load, CPU busy % since the last health read, memory"}, "process": {"type": "object", "description": "the server's own resident memory and threads"}, "isolation": {"type": "object", "description": "The default isolation level, and per level whether it is available and on which runtime"}}},
                "Outcome": {"type": "object", "required": ["task_id", "status"], "properties": {"output": {}, "error": {}, "task_id": {"type": "string"}, "status": {"type": "string"}}}
            }
        },
        "security": [{"bearer": []}],
        "paths": {
            "/api/system/health": {"get": op("System health", ("200", schema("Health")), &[], json!({"security": []}))},
            "/api/openapi.json": {"get": op("This document", ("200", json!({"type": "object"})), &[], json!({"security": []}))},
            "/api/functions/deploy": {"post": op("Deploy a ZIP (multipart or application/zip)", ("201", schema("Deployed")), &four, json!({"requestBody": deploy_body(), "parameters": [{"name": "name", "in": "query", "schema": {"type": "string"}}]}))},
            "/api/functions/": {"get": op("List functions", ("200", schema("FunctionList")), &["401"], any.clone())},
            "/api/functions/{id}": {
                "get": op("A function with its versions", ("200", schema("Function")), &["401", "404"], json!({"parameters": [id_param()]})),
                "put": op("New code (application/zip) or settings (JSON) as the next version", ("200", schema("Deployed")), &four, json!({"parameters": [id_param()], "requestBody": json_body(json!({"type": "object"}))})),
                "delete": op("Delete a function", ("200", schema("Changed")), &["401", "404"], json!({"parameters": [id_param()]}))
            },
            "/api/functions/{id}/versions": {"get": op("Versions", ("200", json!({"type": "object"})), &["401", "404"], json!({"parameters": [id_param()]}))},
            "/api/functions/{id}/activate": {"put": op("Activate", ("200", schema("Changed")), &["401", "404"], json!({"parameters": [id_param()]}))},
            "/api/functions/{id}/deactivate": {"put": op("Deactivate", ("200", schema("Changed")), &["401", "404"], json!({"parameters": [id_param()]}))},
            "/api/functions/{id}/run": {"post": op("Queue an asynchronous run", ("202", schema("Queued")), &four, json!({"parameters": [id_param(), {"name": "version", "in": "query", "schema": {"type": "integer", "minimum": 1}}], "requestBody": json_body(json!({}))}))},
            "/api/functions/{id}/invoke": {"post": op("Run now and wait", ("200", schema("Task")), &four, json!({"parameters": [id_param(), {"name": "version", "in": "query", "schema": {"type": "integer", "minimum": 1}}], "requestBody": json_body(json!({}))}))},
            "/api/functions/{task_id}/status": {"get": op("A task's status and result (seed 000's path)", ("200", schema("Task")), &["401", "404"], json!({"parameters": [task_param("task_id")]}))},
            "/api/functions/{id}/tasks": {"get": op("Recent tasks of a function", ("200", json!({"type": "object"})), &["400", "401", "404"], json!({"parameters": [id_param(), {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 0, "maximum": 500}}]}))},
            "/api/functions/{id}/metrics": {"get": op("Metrics over a range", ("200", schema("Metrics")), &["400", "401", "404"], json!({"parameters": id_and_range()}))},
            "/api/tasks/{task_id}": {"get": op("A task", ("200", schema("Task")), &["401", "404"], json!({"parameters": [task_param("task_id")]}))},
            "/api/tasks/{task_id}/logs": {"get": op("What a task printed", ("200", schema("TaskLogs")), &["401", "404"], json!({"parameters": [task_param("task_id")]}))},
            "/metrics": {"get": {"summary": "Prometheus text exposition: the caller's functions, and the whole system for an admin", "responses": {
                "200": {"description": "success", "content": {"text/plain": {"schema": {"type": "string"}}}},
                "401": {"description": "error", "content": {"application/json": {"schema": schema("Error")}}}
            }}},
            "/": {"get": {"summary": "The dashboard (it asks for a token)", "security": [], "responses": {
                "200": {"description": "success", "content": {"text/html": {"schema": {"type": "string"}}}}
            }}},
            "/api/system/metrics": {"get": op("System metrics over a range", ("200", schema("Metrics")), &["400", "401"], json!({"parameters": range_params()}))},
            "/functions": {
                "get": op("List functions (seed 004)", ("200", schema("FunctionList")), &["401"], any.clone()),
                "post": op("Create (seed 002 JSON, or seed 004 multipart python_file + function_name)", ("201", schema("Deployed")), &four, json!({"requestBody": {"required": true, "content": {
                    "application/json": {"schema": seed002_body()},
                    "multipart/form-data": {"schema": {"type": "object", "required": ["python_file"], "properties": {"python_file": {"type": "string", "format": "binary"}, "function_name": {"type": "string"}}}}
                }}}))
            },
            "/functions/{id}": {
                "get": op("A function (seed 002)", ("200", schema("Function")), &["401", "404"], json!({"parameters": [id_param()]})),
                "put": op("Update code or settings (seed 002)", ("200", schema("Deployed")), &four, json!({"parameters": [id_param()], "requestBody": json_body(json!({"type": "object"}))})),
                "delete": op("Delete (seeds 002, 004)", ("200", schema("Changed")), &["401", "404"], json!({"parameters": [id_param()]}))
            },
            "/functions/{id}/execute": {"post": op("Run with a string payload (seed 004)", ("200", schema("Outcome")), &four, json!({"parameters": [id_param()], "requestBody": {"required": true, "content": {"application/json": {"schema": {"type": "object", "required": ["payload"], "properties": {"payload": {"type": "string"}}}}}}}))},
            "/execute/{id}": {"post": op("Run with {input, parameters} (seed 002)", ("200", schema("Outcome")), &four, json!({"parameters": [id_param()], "requestBody": json_body(json!({"type": "object", "properties": {"input": {}, "parameters": {"type": "object"}}}))}))},
            "/metrics/functions/{id}": {"get": op("Metrics (seed 002)", ("200", schema("Metrics")), &["400", "401", "404"], json!({"parameters": id_and_range()}))},
            "/metrics/system": {"get": op("System metrics (seed 002)", ("200", schema("Metrics")), &["400", "401"], json!({"parameters": range_params()}))}
        }
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_path_has_an_operation_with_responses() {
        let doc = super::document();
        let paths = doc["paths"].as_object().unwrap();
        assert!(paths.len() >= 20);
        for (path, item) in paths {
            for (method, op) in item.as_object().unwrap() {
                assert!(
                    op["responses"].as_object().is_some_and(|r| !r.is_empty()),
                    "{method} {path}"
                );
            }
        }
    }
}
