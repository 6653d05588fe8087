//! `GET /v1/plans`.

use reqwest::{Method, StatusCode};

use crate::helpers::TestApp;

#[tokio::test]
async fn plans_are_listed_in_order_and_localized() {
    let app = TestApp::builder().example_plans("chatbot.toml").start().await;
    let res = app.client.get(app.url("/v1/plans")).header("accept-language", "fr-CI, fr;q=0.9").send().await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let body: serde_json::Value = res.json().await.unwrap();
    let plans = body["plans"].as_array().unwrap();
    let keys: Vec<&str> = plans.iter().map(|p| p["key"].as_str().unwrap()).collect();
    assert_eq!(keys, ["free", "pro", "max", "enterprise"]);
    assert_eq!(plans[0]["name"], "Gratuit");
    assert_eq!(plans[0]["default"], true);
    assert_eq!(plans[1]["prices"][0], serde_json::json!({ "amount": 7000, "currency": "XOF", "period": "month" }));
    let messages = &plans[0]["limits"]["messages"];
    assert_eq!(messages["kind"], "counter");
    assert_eq!(messages["windows"][0], serde_json::json!({ "window": "day", "limit": 5 }));
    assert_eq!(messages["windows"][1], serde_json::json!({ "window": "month", "limit": 150 }));
    assert_eq!(plans[3]["limits"]["messages"]["windows"], serde_json::json!([{ "window": "month", "limit": null }]));
    let en = app.request(Method::GET, "/v1/plans", None, None).await;
    assert_eq!(en.body["plans"][0]["name"], "Free");
    app.stop().await;
}

#[tokio::test]
async fn without_a_plans_file_there_is_a_builtin_free_plan() {
    let app = TestApp::new().await;
    let r = app.request(Method::GET, "/v1/plans", None, None).await;
    assert_eq!(r.body["plans"].as_array().unwrap().len(), 1);
    assert_eq!(r.body["plans"][0]["key"], "free");
    app.stop().await;
}

#[tokio::test]
async fn rate_limits_are_scaled_by_the_multiplier() {
    let app = TestApp::builder().example_plans("saas-api.toml").start().await;
    let r = app.request(Method::GET, "/v1/plans", None, None).await;
    let plans = r.body["plans"].as_array().unwrap();
    let find = |key: &str| plans.iter().find(|p| p["key"] == key).unwrap().clone();
    assert_eq!(find("free")["rate_limits"]["api"]["requests"], 60);
    assert_eq!(find("pro")["rate_limits"]["api"]["requests"], 300);
    assert_eq!(find("pro_plus")["rate_limits"]["api"]["requests"], 600);
    assert_eq!(find("pro")["features"]["support"], "email");
    app.stop().await;
}
