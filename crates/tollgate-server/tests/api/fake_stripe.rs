//! A local stand-in for Stripe's API, for tests only: an axum server on 127.0.0.1 that
//! answers the requests our server sends (customers, Checkout, billing portal,
//! subscriptions), keeps objects in memory, records every request, and builds signed
//! webhook events the way Stripe does so tests can deliver them (duplicated, retried,
//! reordered) to our webhook endpoint. No stripe-mock binary is obtainable here, and
//! fixtures alone cannot follow an object through a flow, hence this fake.

// A toolkit: not every test uses every helper.
#![allow(dead_code)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State as AxumState;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use hmac::{Hmac, KeyInit, Mac};
use serde_json::{Map, Value, json};

/// The API version our server pins; every event carries it.
pub const API_VERSION: &str = "2026-09-30.endive";

#[derive(Clone, Debug)]
pub struct RecordedRequest {
    pub method: String,
    pub path: String,
    /// Header names are lower-case.
    pub headers: Vec<(String, String)>,
    /// Decoded form pairs from the body (POST) or the query string (GET, DELETE).
    pub form: Vec<(String, String)>,
}

impl RecordedRequest {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    pub fn field(&self, name: &str) -> Option<&str> {
        self.form.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }
}

/// A webhook event as Stripe would send it; `payload` is the exact body that is signed.
#[derive(Clone, Debug)]
pub struct Event {
    pub id: String,
    pub event_type: String,
    pub created: i64,
    pub payload: String,
}

impl Event {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.payload).unwrap()
    }
}

/// A Checkout Session and what completing it needs: the prices (with quantities) of
/// its line items and the metadata meant for the payment intent or subscription.
struct Session {
    object: Value,
    lines: Vec<(Value, i64)>,
    child_metadata: Value,
    trial_days: Option<i64>,
}

#[derive(Default)]
struct State {
    /// Seconds since the epoch given to the next object or event (then advanced by 1).
    clock: i64,
    webhook_target: Option<String>,
    requests: Vec<RecordedRequest>,
    /// Events caused by API calls (e.g. DELETE /v1/subscriptions/{id}).
    outbox: Vec<Event>,
    prices: HashMap<String, Value>,
    customers: HashMap<String, Value>,
    sessions: HashMap<String, Session>,
    subscriptions: HashMap<String, Value>,
    /// Invoices by subscription id, oldest first.
    invoices: HashMap<String, Vec<Value>>,
    charges: Vec<Value>,
}

impl State {
    /// The `created` time of a new object or event: distinct and increasing by default.
    fn tick(&mut self) -> i64 {
        self.clock += 1;
        self.clock - 1
    }

    fn event(&mut self, event_type: &str, object: Value, previous: Option<Value>) -> Event {
        let (id, created) = (random_id("evt"), self.tick());
        let mut data = json!({ "object": object });
        if let Some(previous) = previous {
            data["previous_attributes"] = previous;
        }
        let payload = json!({
            "id": id, "object": "event", "api_version": API_VERSION, "created": created, "data": data,
            "livemode": false, "pending_webhooks": 1, "request": { "id": null, "idempotency_key": null },
            "type": event_type,
        });
        Event { id, event_type: event_type.into(), created, payload: payload.to_string() }
    }

    fn subscription(&mut self, id: &str) -> &mut Value {
        self.subscriptions.get_mut(id).unwrap_or_else(|| panic!("fake Stripe: no subscription {id}"))
    }

    /// Merges top-level `changes` into a subscription and emits `customer.subscription.updated`
    /// with the old values of the keys that changed, as Stripe's `previous_attributes` does.
    fn update_subscription(&mut self, id: &str, changes: Value) -> Event {
        let sub = self.subscription(id);
        let mut previous = Map::new();
        for (key, value) in changes.as_object().expect("changes must be a JSON object") {
            let old = sub.get(key).cloned().unwrap_or(Value::Null);
            if old != *value {
                previous.insert(key.clone(), old);
                sub[key] = value.clone();
            }
        }
        let sub = sub.clone();
        self.event("customer.subscription.updated", sub, Some(Value::Object(previous)))
    }

    /// `periods` = (previous period start, service period start, service period end).
    fn invoice(&mut self, sub: &Value, reason: &str, paid: bool, periods: (i64, i64, i64)) -> Value {
        let item = &sub["items"]["data"][0];
        let price = &item["price"];
        let amount = if sub["status"] == "trialing" && reason == "subscription_create" {
            0
        } else {
            price["unit_amount"].as_i64().unwrap_or(0) * item["quantity"].as_i64().unwrap_or(1)
        };
        let invoice = json!({
            "id": random_id("in"), "object": "invoice", "customer": sub["customer"],
            "status": if paid { "paid" } else { "open" }, "amount_due": amount,
            "amount_paid": if paid { amount } else { 0 }, "amount_remaining": if paid { 0 } else { amount },
            "currency": price["currency"], "billing_reason": reason, "attempt_count": 1, "attempted": true,
            "parent": { "type": "subscription_details", "subscription_details": {
                "subscription": sub["id"], "metadata": sub["metadata"] } },
            // As at Stripe, an invoice's own period looks back one period; the period paid
            // for is on its lines.
            "period_start": periods.0, "period_end": periods.1,
            "lines": { "object": "list", "data": [{ "id": random_id("il"), "object": "line_item",
                "amount": amount, "currency": price["currency"], "quantity": item["quantity"],
                "period": { "start": periods.1, "end": periods.2 } }] },
            "created": self.tick(), "livemode": false,
        });
        self.invoices.entry(sub["id"].as_str().unwrap().into()).or_default().push(invoice.clone());
        invoice
    }

    /// A renewal: the subscription's next period and a cycle invoice for it. Returns the
    /// invoice and the changes to apply once the invoice's own event has been emitted.
    fn renew(&mut self, id: &str, paid: bool, status: &str) -> (Value, Value) {
        let sub = self.subscription(id).clone();
        let item = &sub["items"]["data"][0];
        let start = item["current_period_end"].as_i64().unwrap();
        let interval = item["price"]["recurring"]["interval"].as_str().unwrap_or("month");
        let end = next_period_end(sub["billing_cycle_anchor"].as_i64().unwrap(), interval, start);
        let mut items = sub["items"].clone();
        items["data"][0]["current_period_start"] = start.into();
        items["data"][0]["current_period_end"] = end.into();
        let previous_start = item["current_period_start"].as_i64().unwrap();
        let invoice = self.invoice(&sub, "subscription_cycle", paid, (previous_start, start, end));
        let changes = json!({ "status": status, "items": items, "latest_invoice": invoice["id"] });
        (invoice, changes)
    }

    /// The invoice's event, then `customer.subscription.updated`, in Stripe's order.
    fn invoice_events(&mut self, id: &str, invoice_event: &str, invoice: Value, changes: Value) -> Vec<Event> {
        let first = self.event(invoice_event, invoice, None);
        vec![first, self.update_subscription(id, changes)]
    }
}

pub struct FakeStripe {
    /// Base URL such as `http://127.0.0.1:PORT`; our server appends `/v1/...`.
    pub url: String,
    pub webhook_secret: String,
    state: Arc<Mutex<State>>,
    client: reqwest::Client,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for FakeStripe {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl FakeStripe {
    pub async fn start(webhook_secret: &str) -> FakeStripe {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64;
        let state = Arc::new(Mutex::new(State { clock: now, ..State::default() }));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let app = Router::new().fallback(handle).with_state(state.clone());
        let server = tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        FakeStripe { url, webhook_secret: webhook_secret.into(), state, client: reqwest::Client::new(), server }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panicking test helper must not make every later call panic too.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn stop(self) {}

    pub fn set_webhook_target(&self, url: impl Into<String>) {
        self.lock().webhook_target = Some(url.into());
    }

    /// Sets the `created` time of the next object or event.
    pub fn set_clock(&self, unix: i64) {
        self.lock().clock = unix;
    }

    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.lock().requests.clone()
    }

    /// Events caused by our server's API calls (Stripe would send them unasked), drained.
    pub fn take_events(&self) -> Vec<Event> {
        std::mem::take(&mut self.lock().outbox)
    }

    /// Makes `line_items[0][price]=price_id` resolve to this amount and currency.
    pub fn register_price(&self, price_id: &str, unit_amount: i64, currency: &str, recurring_interval: Option<&str>) {
        let price = price_object(price_id, unit_amount, currency, recurring_interval);
        self.lock().prices.insert(price_id.into(), price);
    }

    /// Stored objects, for assertions.
    pub fn subscription(&self, id: &str) -> Option<Value> {
        self.lock().subscriptions.get(id).cloned()
    }

    pub fn customer(&self, id: &str) -> Option<Value> {
        self.lock().customers.get(id).cloned()
    }

    pub fn checkout_session(&self, id: &str) -> Option<Value> {
        self.lock().sessions.get(id).map(|s| s.object.clone())
    }

    /// The customer pays: in payment mode `[checkout.session.completed]`; in subscription
    /// mode `[customer.subscription.created, checkout.session.completed, invoice.paid]`.
    pub fn complete_checkout(&self, session_id: &str) -> Vec<Event> {
        let mut st = self.lock();
        let now = st.tick();
        let session = st.sessions.get(session_id).unwrap_or_else(|| panic!("fake Stripe: no session {session_id}"));
        assert_eq!(session.object["status"], "open", "fake Stripe: session {session_id} is not open");
        let mut object = session.object.clone();
        let (lines, child_metadata, trial_days) =
            (session.lines.clone(), session.child_metadata.clone(), session.trial_days);
        object["status"] = "complete".into();
        object["payment_status"] = "paid".into();
        let mut events = Vec::new();
        if object["mode"] == "payment" {
            let payment_intent = random_id("pi");
            let amount = object["amount_total"].as_i64().unwrap_or(0);
            st.charges.push(json!({
                "id": random_id("ch"), "object": "charge", "amount": amount, "amount_captured": amount,
                "amount_refunded": 0, "currency": object["currency"], "payment_intent": payment_intent,
                "customer": object["customer"], "paid": true, "refunded": false, "status": "succeeded",
                "metadata": child_metadata, "created": now, "livemode": false,
            }));
            object["payment_intent"] = payment_intent.into();
        } else {
            let (price, quantity) = lines[0].clone();
            let interval = price["recurring"]["interval"].as_str().unwrap_or("month").to_string();
            let sub_id = random_id("sub");
            let trial_end = trial_days.map(|days| now + days * 86_400);
            let anchor = trial_end.unwrap_or(now);
            let period_end = trial_end.unwrap_or_else(|| add_interval(now, &interval, 1));
            let sub = json!({
                "id": sub_id, "object": "subscription", "customer": object["customer"],
                "status": if trial_end.is_some() { "trialing" } else { "active" }, "metadata": child_metadata,
                "cancel_at_period_end": false, "cancel_at": null, "canceled_at": null, "ended_at": null,
                "start_date": now, "billing_cycle_anchor": anchor, "created": now, "currency": price["currency"],
                "trial_start": trial_end.map(|_| now), "trial_end": trial_end, "latest_invoice": null,
                "collection_method": "charge_automatically", "livemode": false,
                "items": { "object": "list", "data": [{ "id": random_id("si"), "object": "subscription_item",
                    "subscription": sub_id, "current_period_start": now, "current_period_end": period_end,
                    "quantity": quantity, "price": price, "created": now }] },
            });
            let invoice = st.invoice(&sub, "subscription_create", true, (now, now, period_end));
            let mut sub = sub;
            sub["latest_invoice"] = invoice["id"].clone();
            st.subscriptions.insert(sub_id.clone(), sub.clone());
            events.push(st.event("customer.subscription.created", sub, None));
            object["subscription"] = sub_id.into();
            object["invoice"] = invoice["id"].clone();
            st.sessions.get_mut(session_id).unwrap().object = object.clone();
            events.push(st.event("checkout.session.completed", object, None));
            events.push(st.event("invoice.paid", invoice, None));
            return events;
        }
        st.sessions.get_mut(session_id).unwrap().object = object.clone();
        events.push(st.event("checkout.session.completed", object, None));
        events
    }

    /// Merges `changes` (top-level keys) into the subscription: `customer.subscription.updated`.
    pub fn update_subscription(&self, sub_id: &str, changes: Value) -> Event {
        self.lock().update_subscription(sub_id, changes)
    }

    /// A renewal whose payment fails: the subscription moves to its next period, as at
    /// Stripe, and becomes `past_due`: `[invoice.payment_failed, customer.subscription.updated]`.
    pub fn fail_invoice(&self, sub_id: &str) -> Vec<Event> {
        let mut st = self.lock();
        let (invoice, changes) = st.renew(sub_id, false, "past_due");
        st.invoice_events(sub_id, "invoice.payment_failed", invoice, changes)
    }

    /// Pays the subscription's open invoice (a retry after `fail_invoice`), or else renews
    /// it for the next period with a paid invoice: `[invoice.paid, customer.subscription.updated]`.
    pub fn pay_invoice(&self, sub_id: &str) -> Vec<Event> {
        let mut st = self.lock();
        let open = st.invoices.get_mut(sub_id).and_then(|list| list.iter_mut().rev().find(|i| i["status"] == "open"));
        let (invoice, changes) = if let Some(invoice) = open {
            invoice["amount_paid"] = invoice["amount_due"].clone();
            invoice["amount_remaining"] = 0.into();
            invoice["status"] = "paid".into();
            (invoice.clone(), json!({ "status": "active" }))
        } else {
            st.renew(sub_id, true, "active")
        };
        st.invoice_events(sub_id, "invoice.paid", invoice, changes)
    }

    /// The subscription ends now: `customer.subscription.deleted`.
    pub fn delete_subscription(&self, sub_id: &str) -> Event {
        let mut st = self.lock();
        let sub = cancel(&mut st, sub_id);
        st.event("customer.subscription.deleted", sub, None)
    }

    /// Refunds `amount` of the charge (found by its id or its payment intent's): `charge.refunded`.
    pub fn refund(&self, payment_intent_or_charge: &str, amount: i64) -> Event {
        let mut st = self.lock();
        let key = payment_intent_or_charge;
        let charge = st.charges.iter_mut().find(|c| c["id"] == key || c["payment_intent"] == key);
        let charge = charge.unwrap_or_else(|| panic!("fake Stripe: no charge for {key}"));
        let (old_refunded, old_flag) = (charge["amount_refunded"].as_i64().unwrap(), charge["refunded"].clone());
        let total = charge["amount"].as_i64().unwrap();
        assert!(old_refunded + amount <= total, "fake Stripe: refund exceeds the charge");
        charge["amount_refunded"] = (old_refunded + amount).into();
        charge["refunded"] = (old_refunded + amount == total).into();
        let mut previous = json!({ "amount_refunded": old_refunded });
        if charge["refunded"] != old_flag {
            previous["refunded"] = old_flag;
        }
        let charge = charge.clone();
        st.event("charge.refunded", charge, Some(previous))
    }

    /// Any event, e.g. a type our server does not handle.
    pub fn event(&self, event_type: &str, object: Value) -> Event {
        self.lock().event(event_type, object, None)
    }

    pub fn sign(&self, payload: &str, t: i64) -> String {
        signature_header(&self.webhook_secret, payload, t)
    }

    /// Posts the event to the webhook target as Stripe does, signed for the real time now.
    pub async fn deliver(&self, event: &Event) -> reqwest::Response {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64;
        self.deliver_with(event, self.sign(&event.payload, now)).await
    }

    /// Like `deliver` with any `Stripe-Signature` header, for tests of bad signatures.
    pub async fn deliver_with(&self, event: &Event, signature_header: String) -> reqwest::Response {
        let target = self.lock().webhook_target.clone().expect("fake Stripe: call set_webhook_target first");
        self.client
            .post(target)
            .header("content-type", "application/json; charset=utf-8")
            .header("user-agent", "Stripe/1.0 (+https://stripe.com/docs/webhooks)")
            .header("stripe-signature", signature_header)
            .body(event.payload.clone())
            .send()
            .await
            .expect("fake Stripe: webhook delivery failed")
    }

    /// Delivers the events one after another, in the given order.
    pub async fn deliver_all(&self, events: &[Event]) -> Vec<reqwest::Response> {
        let mut responses = Vec::new();
        for event in events {
            responses.push(self.deliver(event).await);
        }
        responses
    }
}

/// Stripe's `Stripe-Signature`: `t=<t>,v1=<hex HMAC-SHA256 of "{t}.{payload}">`, keyed
/// with the whole `whsec_...` string.
pub fn signature_header(secret: &str, payload: &str, t: i64) -> String {
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(format!("{t}.{payload}").as_bytes());
    format!("t={t},v1={}", hex::encode(mac.finalize().into_bytes()))
}

fn random_id(prefix: &str) -> String {
    const ALPHABET: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    let mut bytes = [0u8; 24];
    rand::fill(&mut bytes);
    let tail: String = bytes.iter().map(|b| ALPHABET[*b as usize % ALPHABET.len()] as char).collect();
    format!("{prefix}_{tail}")
}

fn price_object(id: &str, unit_amount: i64, currency: &str, interval: Option<&str>) -> Value {
    json!({ "id": id, "object": "price", "unit_amount": unit_amount, "currency": currency.to_lowercase(),
        "recurring": interval.map(|i| json!({ "interval": i, "interval_count": 1 })),
        "lookup_key": null, "metadata": {} })
}

/// `t` plus `n` intervals; months clamp to the month's end like Stripe (Jan 31 → Feb 28).
fn add_interval(t: i64, interval: &str, n: i32) -> i64 {
    let months = match interval {
        "day" => return t + 86_400 * n as i64,
        "week" => return t + 7 * 86_400 * n as i64,
        "year" => 12 * n,
        _ => n,
    };
    let dt = time::OffsetDateTime::from_unix_timestamp(t).unwrap();
    let index = dt.year() * 12 + dt.month() as i32 - 1 + months;
    let (year, month) = (index.div_euclid(12), time::Month::try_from((index.rem_euclid(12) + 1) as u8).unwrap());
    let date = time::Date::from_calendar_date(year, month, dt.day().min(month.length(year))).unwrap();
    dt.replace_date(date).unix_timestamp()
}

/// The first period boundary after `after`, counted from the anchor so days do not drift.
fn next_period_end(anchor: i64, interval: &str, after: i64) -> i64 {
    (1..).map(|n| add_interval(anchor, interval, n)).find(|&end| end > after).unwrap()
}

fn cancel(st: &mut State, sub_id: &str) -> Value {
    let now = st.tick();
    let sub = st.subscription(sub_id);
    if sub["status"] != "canceled" {
        sub["status"] = "canceled".into();
        sub["canceled_at"] = now.into();
        sub["ended_at"] = now.into();
    }
    sub.clone()
}

/// Decodes `application/x-www-form-urlencoded` into pairs, in order.
pub fn decode_form(body: &str) -> Vec<(String, String)> {
    let decode = |s: &str| {
        let s = s.as_bytes();
        let (mut out, mut i) = (Vec::with_capacity(s.len()), 0);
        while i < s.len() {
            let hex = s.get(i + 1..i + 3).and_then(|h| u8::from_str_radix(std::str::from_utf8(h).ok()?, 16).ok());
            match (s[i], hex) {
                (b'+', _) => out.push(b' '),
                (b'%', Some(b)) => {
                    out.push(b);
                    i += 2;
                }
                (c, _) => out.push(c),
            }
            i += 1;
        }
        String::from_utf8_lossy(&out).into_owned()
    };
    let pairs = body.split('&').filter(|p| !p.is_empty());
    pairs.map(|p| p.split_once('=').unwrap_or((p, ""))).map(|(k, v)| (decode(k), decode(v))).collect()
}

/// Stripe's bracket notation to nested JSON: `a[b][c]=v` → `{"a":{"b":{"c":"v"}}}`; keys
/// that are all numbers (or `[]`) make arrays, except under `metadata`. Values stay strings.
pub fn parse_form(pairs: &[(String, String)]) -> Value {
    let mut root = json!({});
    for (key, value) in pairs {
        let mut path = vec![key.as_str()];
        if let Some((head, rest)) = key.split_once('[') {
            path = std::iter::once(head).chain(rest.strip_suffix(']').unwrap_or(rest).split("][")).collect();
        }
        let mut node = &mut root;
        for (i, segment) in path.iter().enumerate() {
            if !node.is_object() {
                *node = json!({});
            }
            let object = node.as_object_mut().unwrap();
            let segment = if segment.is_empty() { object.len().to_string() } else { segment.to_string() };
            if i + 1 == path.len() {
                object.insert(segment, Value::String(value.clone()));
                break;
            }
            node = object.entry(segment).or_insert_with(|| json!({}));
        }
    }
    arrays(root, "")
}

fn arrays(value: Value, key: &str) -> Value {
    let Value::Object(object) = value else { return value };
    let mut entries: Vec<(String, Value)> = object.into_iter().map(|(k, v)| (k.clone(), arrays(v, &k))).collect();
    if key == "metadata" || entries.is_empty() || !entries.iter().all(|(k, _)| k.parse::<usize>().is_ok()) {
        return Value::Object(entries.into_iter().collect());
    }
    entries.sort_by_key(|(k, _)| k.parse::<usize>().unwrap());
    Value::Array(entries.into_iter().map(|(_, v)| v).collect())
}

/// An error answered with Stripe's status and `{"error":{...}}` body.
struct ApiError(StatusCode, Value);

fn api_error(status: u16, message: impl Into<String>, param: Option<&str>, code: Option<&str>) -> ApiError {
    let mut error = json!({ "type": "invalid_request_error", "message": message.into() });
    if let Some(param) = param {
        error["param"] = param.into();
    }
    if let Some(code) = code {
        error["code"] = code.into();
        error["doc_url"] = format!("https://stripe.com/docs/error-codes/{}", code.replace('_', "-")).into();
    }
    ApiError(StatusCode::from_u16(status).unwrap(), json!({ "error": error }))
}

fn invalid(message: impl Into<String>, param: &str) -> ApiError {
    api_error(400, message, Some(param), None)
}

/// A required string field, addressed by its bracket name (`line_items[0][quantity]`).
fn required<'a>(form: &'a Value, name: &str) -> Result<&'a str, ApiError> {
    let pointer = format!("/{}", name.replace("][", "/").replace(['[', ']'], "/").trim_end_matches('/'));
    let missing = || api_error(400, format!("Missing required param: {name}."), Some(name), Some("parameter_missing"));
    form.pointer(&pointer).and_then(Value::as_str).filter(|s| !s.is_empty()).ok_or_else(missing)
}

fn integer(form: &Value, name: &str) -> Result<i64, ApiError> {
    let text = required(form, name)?;
    text.parse().map_err(|_| invalid(format!("Invalid integer: {text}"), name))
}

async fn handle(
    AxumState(state): AxumState<Arc<Mutex<State>>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let raw: String =
        if method == Method::POST { String::from_utf8_lossy(&body).into() } else { uri.query().unwrap_or("").into() };
    let header_pairs = headers.iter().map(|(n, v)| (n.to_string(), String::from_utf8_lossy(v.as_bytes()).into()));
    let (method_name, path) = (method.to_string(), uri.path().to_string());
    let request =
        RecordedRequest { method: method_name, path, headers: header_pairs.collect(), form: decode_form(&raw) };
    let form = parse_form(&request.form);
    let mut st = state.lock().unwrap_or_else(|e| e.into_inner());
    st.requests.push(request);
    let (status, body) = match route(&mut st, &method, uri.path(), &headers, &form) {
        Ok(object) => (StatusCode::OK, object),
        Err(ApiError(status, body)) => (status, body),
    };
    (status, [("request-id", random_id("req"))], axum::Json(body)).into_response()
}

const NO_KEY: &str = "You did not provide an API key. You need to provide your API key in the Authorization \
                      header, using Bearer auth (e.g. 'Authorization: Bearer YOUR_SECRET_KEY').";
const HELP: &str = "Please see https://stripe.com/docs or we can help at https://support.stripe.com/.";

fn route(st: &mut State, method: &Method, path: &str, headers: &HeaderMap, form: &Value) -> Result<Value, ApiError> {
    let auth = headers.get("authorization").and_then(|v| v.to_str().ok());
    match auth.and_then(|a| a.strip_prefix("Bearer ")) {
        None => return Err(api_error(401, NO_KEY, None, None)),
        Some(key) if !key.starts_with("sk_test_") || key.len() < 12 => {
            let shown = format!("{}****{}", &key[..key.len().min(8)], &key[key.len().saturating_sub(4)..]);
            return Err(api_error(401, format!("Invalid API Key provided: {shown}"), None, None));
        }
        Some(_) => {}
    }
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    match (method.as_str(), segments.as_slice()) {
        ("POST", ["v1", "customers"]) => {
            let customer = json!({ "id": random_id("cus"), "object": "customer", "email": form["email"],
                "name": form["name"], "metadata": form.get("metadata").cloned().unwrap_or(json!({})),
                "created": st.tick(), "livemode": false });
            st.customers.insert(customer["id"].as_str().unwrap().into(), customer.clone());
            Ok(customer)
        }
        ("POST", ["v1", "checkout", "sessions"]) => create_checkout_session(st, form),
        ("POST", ["v1", "billing_portal", "sessions"]) => Ok(json!({
            "id": random_id("bps"), "object": "billing_portal.session",
            "url": format!("https://billing.stripe.com/p/session/{}", random_id("test")),
            "customer": required(form, "customer")?, "return_url": form["return_url"],
            "created": st.tick(), "livemode": false })),
        ("GET" | "DELETE", ["v1", "subscriptions", id]) if !st.subscriptions.contains_key(*id) => {
            Err(api_error(404, format!("No such subscription: '{id}'"), Some("id"), Some("resource_missing")))
        }
        ("GET", ["v1", "subscriptions", id]) => Ok(st.subscriptions[*id].clone()),
        ("DELETE", ["v1", "subscriptions", id]) => {
            let was_canceled = st.subscriptions[*id]["status"] == "canceled";
            let sub = cancel(st, id);
            if !was_canceled {
                let event = st.event("customer.subscription.deleted", sub.clone(), None);
                st.outbox.push(event);
            }
            Ok(sub)
        }
        _ => Err(api_error(404, format!("Unrecognized request URL ({method}: {path}). {HELP}"), None, None)),
    }
}

fn create_checkout_session(st: &mut State, form: &Value) -> Result<Value, ApiError> {
    let mode = required(form, "mode")?;
    if mode != "payment" && mode != "subscription" {
        return Err(invalid(format!("Invalid mode: {mode} (this fake knows payment and subscription)"), "mode"));
    }
    let success_url = required(form, "success_url")?;
    let count = form["line_items"].as_array().map_or(0, Vec::len);
    if count == 0 {
        return Err(invalid("You must provide `line_items` in this mode.", "line_items"));
    }
    let mut lines = Vec::new();
    for i in 0..count {
        let item = |f: &str| format!("line_items[{i}][{f}]");
        let quantity = integer(form, &item("quantity"))?;
        let price = if let Ok(id) = required(form, &item("price")) {
            let unknown = || price_object(id, 0, "usd", (mode == "subscription").then_some("month"));
            st.prices.get(id).cloned().unwrap_or_else(unknown)
        } else {
            let data = |f: &str| item(&format!("price_data][{f}"));
            let interval = required(form, &data("recurring][interval")).ok();
            let unit_amount = integer(form, &data("unit_amount"))?;
            required(form, &data("product_data][name"))?;
            price_object(&random_id("price"), unit_amount, required(form, &data("currency"))?, interval)
        };
        match (mode, price["recurring"].is_null()) {
            ("payment", false) => return Err(invalid("`payment` mode was given a recurring price.", &item("price"))),
            ("subscription", true) => {
                return Err(invalid("`subscription` mode needs a recurring price.", &item("price")));
            }
            _ => lines.push((price, quantity)),
        }
    }
    let amount_total: i64 = lines.iter().map(|(p, q)| p["unit_amount"].as_i64().unwrap_or(0) * q).sum();
    let (id, created) = (random_id("cs_test"), st.tick());
    let child = if mode == "payment" { "payment_intent_data" } else { "subscription_data" };
    let trial_days = match required(form, "subscription_data[trial_period_days]") {
        Ok(_) => Some(integer(form, "subscription_data[trial_period_days]")?),
        Err(_) => None,
    };
    let object = json!({
        "id": id, "object": "checkout.session", "url": format!("https://checkout.stripe.com/c/pay/{id}"),
        "mode": mode, "customer": form["customer"], "client_reference_id": form["client_reference_id"],
        "metadata": form.get("metadata").cloned().unwrap_or(json!({})), "status": "open",
        "payment_status": "unpaid", "amount_subtotal": amount_total, "amount_total": amount_total,
        "currency": lines[0].0["currency"], "success_url": success_url, "cancel_url": form["cancel_url"],
        "payment_intent": null, "subscription": null, "invoice": null, "created": created,
        "expires_at": created + 86_400, "livemode": false,
    });
    let child_metadata = form[child].get("metadata").cloned().unwrap_or(json!({}));
    st.sessions.insert(id, Session { object: object.clone(), lines, child_metadata, trial_days });
    Ok(object)
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "sk_test_123456789";

    #[test]
    fn signature_matches_a_known_vector() {
        let header = signature_header("whsec_test_secret", r#"{"id":"evt_1"}"#, 1_700_000_000);
        let mut mac = Hmac::<sha2::Sha256>::new_from_slice(b"whsec_test_secret").unwrap();
        mac.update(br#"1700000000.{"id":"evt_1"}"#);
        let hex_part = header.strip_prefix("t=1700000000,v1=").expect(&header);
        assert_eq!(hex_part.len(), 64);
        assert_eq!(hex_part, hex::encode(mac.finalize().into_bytes()));
        // The same vector computed by Python's `hmac` module.
        assert_eq!(hex_part, "248a374f50f943a28b0f6ab50faf9a7e7e29b710fa26df9fb1618b9bf8ea9c9a");
    }

    #[test]
    fn forms_parse_into_nested_objects_and_arrays() {
        let pairs = decode_form(
            "mode=payment&metadata%5Baccount_id%5D=acc+1&line_items[1][quantity]=2&line_items[0][quantity]=1\
             &line_items[0][price_data][product_data][name]=Pro%20plan&metadata[0]=kept&expand[]=a&expand[]=b",
        );
        assert_eq!(pairs[1], ("metadata[account_id]".into(), "acc 1".into()));
        let expected = json!({ "mode": "payment", "metadata": { "account_id": "acc 1", "0": "kept" },
            "expand": ["a", "b"], "line_items": [
                { "quantity": "1", "price_data": { "product_data": { "name": "Pro plan" } } }, { "quantity": "2" }] });
        assert_eq!(parse_form(&pairs), expected);
    }

    async fn post(fake: &FakeStripe, path: &str, form: &[(&str, &str)]) -> (u16, Value) {
        let request = reqwest::Client::new().post(format!("{}{path}", fake.url)).bearer_auth(KEY);
        let request = request.header("stripe-version", API_VERSION).header("idempotency-key", "key-1");
        let res = request.form(&form).send().await.unwrap();
        (res.status().as_u16(), res.json().await.unwrap())
    }

    #[tokio::test]
    async fn payment_checkout_round_trip() {
        let fake = FakeStripe::start("whsec_test_secret").await;
        let (status, customer) = post(&fake, "/v1/customers", &[("metadata[account_id]", "acc_1")]).await;
        assert_eq!((status, customer["metadata"]["account_id"].as_str()), (200, Some("acc_1")));
        let form = [
            ("mode", "payment"),
            ("customer", customer["id"].as_str().unwrap()),
            ("success_url", "https://app.test/ok"),
            ("line_items[0][quantity]", "2"),
            ("line_items[0][price_data][currency]", "eur"),
            ("line_items[0][price_data][unit_amount]", "500"),
            ("line_items[0][price_data][product_data][name]", "1000 credits"),
            ("metadata[credits]", "1000"),
            ("payment_intent_data[metadata][credits]", "1000"),
        ];
        let (status, session) = post(&fake, "/v1/checkout/sessions", &form).await;
        assert_eq!(
            (status, session["amount_total"].as_i64(), session["status"].as_str()),
            (200, Some(1000), Some("open"))
        );
        let events = fake.complete_checkout(session["id"].as_str().unwrap());
        let event = events[0].json();
        assert_eq!((events.len(), event["type"].as_str()), (1, Some("checkout.session.completed")));
        assert_eq!((event["object"].as_str(), event["api_version"].as_str()), (Some("event"), Some(API_VERSION)));
        let object = &event["data"]["object"];
        assert!(object["payment_intent"].as_str().unwrap().starts_with("pi_"));
        assert_eq!(
            (object["metadata"]["credits"].as_str(), object["payment_status"].as_str()),
            (Some("1000"), Some("paid"))
        );
        let charge = fake.refund(object["payment_intent"].as_str().unwrap(), 1000).json()["data"]["object"].clone();
        assert_eq!((charge["refunded"].as_bool(), charge["metadata"]["credits"].as_str()), (Some(true), Some("1000")));

        let sent = &fake.requests()[1];
        assert_eq!(sent.field("line_items[0][price_data][unit_amount]"), Some("500"));
        assert_eq!((sent.header("Stripe-Version"), sent.header("idempotency-key")), (Some(API_VERSION), Some("key-1")));
        let res = reqwest::Client::new().post(format!("{}/v1/customers", fake.url)).send().await.unwrap();
        assert_eq!(res.status().as_u16(), 401);
        let body: Value = res.json().await.unwrap();
        assert_eq!(body["error"]["type"], "invalid_request_error");

        // Delivered to the fake itself, which records what a webhook receiver would see.
        fake.set_webhook_target(format!("{}/webhook", fake.url));
        fake.deliver(&events[0]).await;
        let delivered = fake.requests().pop().unwrap();
        let signature = delivered.header("stripe-signature").unwrap();
        let t: i64 = signature[2..signature.find(',').unwrap()].parse().unwrap();
        assert_eq!(signature, fake.sign(&events[0].payload, t));
        assert_eq!(delivered.header("content-type"), Some("application/json; charset=utf-8"));
    }

    #[tokio::test]
    async fn subscription_checkout_renewal_and_cancel() {
        let fake = FakeStripe::start("whsec_test_secret").await;
        fake.register_price("price_pro", 2900, "usd", Some("month"));
        fake.set_clock(1_706_659_200); // 2024-01-31: periods end Feb 29, then Mar 31.
        let form = [
            ("mode", "subscription"),
            ("customer", "cus_1"),
            ("success_url", "https://app.test/ok"),
            ("line_items[0][price]", "price_pro"),
            ("line_items[0][quantity]", "1"),
            ("subscription_data[metadata][plan]", "pro"),
        ];
        let (status, session) = post(&fake, "/v1/checkout/sessions", &form).await;
        assert_eq!((status, session["amount_total"].as_i64()), (200, Some(2900)));
        let events = fake.complete_checkout(session["id"].as_str().unwrap());
        let types: Vec<&str> = events.iter().map(|e| e.event_type.as_str()).collect();
        assert_eq!(types, ["customer.subscription.created", "checkout.session.completed", "invoice.paid"]);
        assert!(events.windows(2).all(|w| w[0].created < w[1].created));
        let sub = events[0].json()["data"]["object"].clone();
        let sub_id = sub["id"].as_str().unwrap();
        assert_eq!((sub["status"].as_str(), sub["metadata"]["plan"].as_str()), (Some("active"), Some("pro")));
        assert_eq!(sub["items"]["data"][0]["current_period_end"], 1_709_164_800 + 1); // + the session's tick
        assert_eq!(events[2].json()["data"]["object"]["parent"]["subscription_details"]["subscription"], sub_id);

        let failed = fake.fail_invoice(sub_id);
        let updated = failed[1].json()["data"].clone();
        assert_eq!(
            (failed[0].event_type.as_str(), updated["object"]["status"].as_str()),
            ("invoice.payment_failed", Some("past_due"))
        );
        assert_eq!(updated["previous_attributes"]["status"], "active");
        assert_eq!(updated["object"]["items"]["data"][0]["current_period_end"], 1_711_843_200 + 1);
        assert_eq!(fake.pay_invoice(sub_id)[1].json()["data"]["object"]["status"], "active");

        let (client, url) = (reqwest::Client::new(), format!("{}/v1/subscriptions/{sub_id}", fake.url));
        let got: Value = client.get(&url).bearer_auth(KEY).send().await.unwrap().json().await.unwrap();
        assert_eq!(got["status"], "active");
        let gone: Value = client.delete(&url).bearer_auth(KEY).send().await.unwrap().json().await.unwrap();
        assert_eq!(
            (gone["status"].as_str(), fake.take_events()[0].event_type.as_str()),
            (Some("canceled"), "customer.subscription.deleted")
        );
        let missing = client.get(format!("{url}x")).bearer_auth(KEY).send().await.unwrap();
        assert_eq!(missing.status().as_u16(), 404);
    }
}
