//! Anomaly detection's routes: a function's anomalies (how its series stand, its events, its
//! scored minutes) and every anomaly the caller sees, with the system's series for admins.

use serde_json::json;
use warp::http::{Method, StatusCode};

use super::body::RangeQuery;
use super::functions::token;
use super::openapi::{id_and_range, op, range_params, schema};
use super::router::{json as reply, Ctx, Reply, Route};

async fn function(c: Ctx) -> Reply {
    let (since, until) = c.query::<RangeQuery>()?.resolve()?;
    let body = c
        .state
        .platform
        .function_anomalies(c.caller(), c.param(0), since, until)
        .await?;
    Ok(reply(StatusCode::OK, &body))
}

async fn system(c: Ctx) -> Reply {
    let (since, until) = c.query::<RangeQuery>()?.resolve()?;
    let body = c
        .state
        .platform
        .system_anomalies(c.caller(), since, until)
        .await?;
    Ok(reply(StatusCode::OK, &body))
}

/// The routes.
pub fn routes() -> Vec<Route> {
    vec![
        token(
            Method::GET,
            "/api/functions/{id}/anomalies",
            false,
            |c| Box::pin(function(c)),
            || {
                let params = json!({"parameters": id_and_range()});
                let what = "A function's anomalies: each series' state (learning or watched), its anomaly events and its scored minutes over a range (the last day by default)";
                op(what, ("200", schema("Anomalies")), &["400", "404"], params)
            },
        ),
        token(
            Method::GET,
            "/api/system/anomalies",
            false,
            |c| Box::pin(system(c)),
            || {
                let params = json!({"parameters": range_params()});
                let what = "Anomaly events of every function the caller sees over a range (the last day by default), and for an admin the system's series and theirs";
                op(what, ("200", schema("SystemAnomalies")), &["400"], params)
            },
        ),
    ]
}
