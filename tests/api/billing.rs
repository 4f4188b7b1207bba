//! Selling credits: the package list.

use serde_json::Value;

use crate::helpers::*;

const PACKAGES: &str = r#"
[[packages]]
id = "starter"
name = "Starter"
credits = "1000"
price = "9.99"
currency = "USD"

[[packages]]
id = "retired"
name = "Old deal"
credits = "10"
price = "0.50"
currency = "EUR"
active = false

[[packages]]
id = "enterprise"
name = "Enterprise"
credits = "15000"
price = "99.99"
currency = "USD"
validity_days = 365
"#;

#[tokio::test]
async fn the_active_packages_are_listed_with_exact_prices() {
    run_test(async || {
        let app = spawn_app_with(Options {
            extra: PACKAGES.into(),
            ..Options::default()
        })
        .await;
        let response = app.get("/api/credits/packages", &token("buyer")).await;
        assert_eq!(response.status(), 200);
        let body: Value = response.json().await.expect("json");
        let data = body["data"].as_array().expect("list");
        let ids: Vec<&str> = data.iter().map(|p| p["id"].as_str().expect("id")).collect();
        assert_eq!(
            ids,
            ["starter", "enterprise"],
            "retired packages are not offered"
        );
        assert_eq!(data[0]["credits"], "1000");
        assert_eq!(data[0]["price"], "9.99");
        assert_eq!(data[0]["currency"], "USD");
        assert_eq!(data[1]["validity_days"], 365);
        assert!(data[0]["validity_days"].is_null());
        // Like every user route, it needs a credential.
        openai_error(
            app.client
                .get(app.url("/api/credits/packages"))
                .send()
                .await
                .expect("sent"),
            401,
        )
        .await;
    })
    .await;
}
