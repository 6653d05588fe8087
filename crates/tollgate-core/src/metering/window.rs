//! Quota windows: which instance of a window an instant falls in, its storage key and
//! when it resets. Pure arithmetic on the instant, so windows roll over by time alone (no
//! cron, no reset job): the next instance simply has another key. Everything is UTC and
//! whole seconds; sub-second parts of `now` and of the anchor are truncated.
//!
//! Boundaries are computed with `time`, whose dates end at year 9999: the functions
//! here panic for instants whose window would end beyond that.

use std::cell::RefCell;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use time::{Date, Month, PrimitiveDateTime, UtcOffset};

use crate::Timestamp;

/// The longest rolling window accepted: 366 days.
pub const MAX_ROLLING_SECONDS: u64 = 366 * 86_400;

/// At most this many buckets per rolling window, so a counter store stays small.
const MAX_BUCKETS: u64 = 60;

const OUT_OF_RANGE: &str = "window boundary beyond the dates `time` can represent";

/// A quota window. Text (and serde) form: `day`, `month`, `billing_period`, `lifetime`,
/// `rolling:<seconds>`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Window {
    /// A UTC calendar day, `[00:00, next 00:00)`.
    Day,
    /// A UTC calendar month, `[1st 00:00, next 1st 00:00)`.
    Month,
    /// Monthly periods from the subscription start: same time of day, same day of month,
    /// clamped to short months (a 31st anchor gives Feb 28, then Mar 31 again). Without
    /// an anchor, the calendar month.
    BillingPeriod,
    /// Never resets.
    Lifetime,
    /// The last `seconds`, counted in buckets of [`bucket_seconds`]: exact at bucket
    /// granularity. A use is counted from its bucket until `ceil(seconds / size)`
    /// buckets later, so for between `(n - 1) * size` and `n * size` seconds
    /// (`n * size` is at least `seconds` and less than `seconds + size`).
    Rolling { seconds: u64 },
}

/// A window that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WindowError {
    #[error("unknown window {0:?} (expected day, month, billing_period, lifetime or rolling:<seconds>)")]
    Unknown(String),
    #[error("{0:?}: a rolling window is 1 to {max} whole seconds (366 days)", max = MAX_ROLLING_SECONDS)]
    Rolling(String),
}

impl Window {
    pub fn parse(s: &str) -> Result<Window, WindowError> {
        match s {
            "day" => Ok(Window::Day),
            "month" => Ok(Window::Month),
            "billing_period" => Ok(Window::BillingPeriod),
            "lifetime" => Ok(Window::Lifetime),
            _ => {
                let Some(n) = s.strip_prefix("rolling:") else {
                    return Err(WindowError::Unknown(s.to_owned()));
                };
                // Digits only: `u64::from_str` also takes a `+` sign.
                let seconds = n.bytes().all(|b| b.is_ascii_digit()).then(|| n.parse::<u64>().ok()).flatten();
                match seconds {
                    Some(seconds @ 1..=MAX_ROLLING_SECONDS) => Ok(Window::Rolling { seconds }),
                    _ => Err(WindowError::Rolling(s.to_owned())),
                }
            }
        }
    }

    pub fn as_string(&self) -> String {
        match self {
            Window::Day => "day".into(),
            Window::Month => "month".into(),
            Window::BillingPeriod => "billing_period".into(),
            Window::Lifetime => "lifetime".into(),
            Window::Rolling { seconds } => format!("rolling:{seconds}"),
        }
    }
}

impl fmt::Display for Window {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.as_string())
    }
}

impl FromStr for Window {
    type Err = WindowError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Window::parse(s)
    }
}

impl TryFrom<String> for Window {
    type Error = WindowError;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        Window::parse(&s)
    }
}

impl From<Window> for String {
    fn from(window: Window) -> String {
        window.as_string()
    }
}

/// One instance of a window, `[start, end)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Span {
    /// For [`Window::Lifetime`], the earliest instant `time` can represent.
    pub start: Timestamp,
    /// Exclusive; `None` only for [`Window::Lifetime`].
    pub end: Option<Timestamp>,
}

/// The instance of `window` containing `now`. `anchor` (the subscription start) only
/// matters for [`Window::BillingPeriod`]. For [`Window::Rolling`], the buckets counted at
/// `now`: from the start of the oldest to the end of the current one.
pub fn span(window: Window, now: Timestamp, anchor: Option<Timestamp>) -> Span {
    let now = whole_second(now);
    match (window, anchor) {
        (Window::Day, _) => {
            let end = now.date().next_day().expect(OUT_OF_RANGE);
            Span { start: now.date().midnight().assume_utc(), end: Some(end.midnight().assume_utc()) }
        }
        (Window::BillingPeriod, Some(anchor)) => monthly(now, whole_second(anchor)),
        // A calendar month is the billing period anchored on the 1st at midnight.
        (Window::Month | Window::BillingPeriod, _) => {
            monthly(now, now.date().replace_day(1).expect("day 1").midnight().assume_utc())
        }
        (Window::Lifetime, _) => Span { start: PrimitiveDateTime::MIN.assume_utc(), end: None },
        (Window::Rolling { seconds }, _) => {
            let b = Buckets::at(seconds, now);
            Span { start: unix(b.oldest * b.size), end: Some(unix((b.current + 1) * b.size)) }
        }
    }
}

/// A stable, compact storage key for the instance of `window` containing `now`: the
/// same for two instants exactly when they are in the same [`span`]. For
/// [`Window::Rolling`], the key of the current bucket (the row a use increments).
pub fn key(window: Window, now: Timestamp, anchor: Option<Timestamp>) -> String {
    let date = whole_second(now).date();
    match window {
        // `d:YYYY-MM-DD` and `m:YYYY-MM`, written without `fmt` (on every decision).
        Window::Day | Window::Month if date.year() < 0 => fmt_key(window, date),
        Window::Day | Window::Month => {
            let mut key = String::with_capacity(12);
            key.push_str(if window == Window::Day { "d:" } else { "m:" });
            push_padded(&mut key, date.year().into(), 4);
            key.push('-');
            push_padded(&mut key, u8::from(date.month()).into(), 2);
            if window == Window::Day {
                key.push('-');
                push_padded(&mut key, date.day().into(), 2);
            }
            key
        }
        // Keyed by its start, and never `m:` even without an anchor, so a meter limited
        // per month and per billing period keeps two counters.
        Window::BillingPeriod => format!("b:{}", span(window, now, anchor).start.unix_timestamp()),
        Window::Lifetime => "l".into(),
        Window::Rolling { seconds } => {
            let b = Buckets::at(seconds, now);
            b.key(b.current)
        }
    }
}

/// The keys of every bucket a rolling window of `seconds` counts at `now`, oldest first;
/// the last is [`key`]'s. Shared: they are the same for every decision until the
/// current bucket moves on, so each thread keeps the last few lists and a decision
/// clones an `Arc` instead of building up to 60 strings (BENCHMARKS.md).
pub fn rolling_bucket_keys(seconds: u64, now: Timestamp) -> Arc<[String]> {
    /// Lists remembered per thread (one per rolling window length in use).
    const REMEMBERED: usize = 8;
    /// (window seconds, current bucket, its keys).
    type Recent = Vec<(u64, i64, Arc<[String]>)>;
    thread_local! {
        static RECENT: RefCell<Recent> = const { RefCell::new(Vec::new()) };
    }
    let b = Buckets::at(seconds, now);
    RECENT.with(|recent| {
        let mut recent = recent.borrow_mut();
        if let Some((_, _, keys)) = recent.iter().find(|(s, current, _)| *s == seconds && *current == b.current) {
            return keys.clone();
        }
        let prefix = b.key_prefix();
        let keys: Arc<[String]> = (b.oldest..=b.current)
            .map(|index| {
                let mut key = String::with_capacity(prefix.len() + 20);
                key.push_str(&prefix);
                push_decimal(&mut key, index);
                key
            })
            .collect();
        recent.retain(|(s, _, _)| *s != seconds);
        if recent.len() >= REMEMBERED {
            recent.remove(0);
        }
        recent.push((seconds, b.current, keys.clone()));
        keys
    })
}

/// The day and month keys as `format!` writes them (years before 0, and the tests).
fn fmt_key(window: Window, date: Date) -> String {
    match window {
        Window::Day => format!("d:{:04}-{:02}-{:02}", date.year(), u8::from(date.month()), date.day()),
        _ => format!("m:{:04}-{:02}", date.year(), u8::from(date.month())),
    }
}

/// Appends `n` (non-negative) in decimal, zero-padded to `width` digits.
fn push_padded(out: &mut String, n: i64, width: usize) {
    let start = out.len();
    push_decimal(out, n);
    let digits = out.len() - start;
    for _ in digits..width {
        out.insert(start, '0');
    }
}

/// Appends `n` in decimal.
fn push_decimal(out: &mut String, n: i64) {
    let mut digits = [0u8; 20];
    let mut start = digits.len();
    let mut rest = n.unsigned_abs();
    loop {
        start -= 1;
        digits[start] = b'0' + (rest % 10) as u8;
        rest /= 10;
        if rest == 0 {
            break;
        }
    }
    if n < 0 {
        out.push('-');
    }
    out.push_str(std::str::from_utf8(&digits[start..]).expect("ASCII digits"));
}

/// Length in seconds of the buckets of a rolling window of `seconds`: at most about 60
/// buckets per window, never under a second. Bucket `b` covers `[b * size, (b + 1) * size)`
/// in unix seconds.
pub fn bucket_seconds(seconds: u64) -> u64 {
    seconds.div_ceil(MAX_BUCKETS).max(1)
}

/// When the instance of `window` containing `now` ends: the end of its [`span`], `None`
/// for [`Window::Lifetime`]. For [`Window::Rolling`], the end of the current bucket: the
/// oldest counted bucket drops out then, so it is the next time any usage can be freed
/// (after that, one bucket every `size` seconds).
pub fn resets_at(window: Window, now: Timestamp, anchor: Option<Timestamp>) -> Option<Timestamp> {
    span(window, now, anchor).end
}

/// A rolling window at one instant, in bucket indices.
struct Buckets {
    seconds: u64,
    size: i64,
    oldest: i64,
    current: i64,
}

impl Buckets {
    fn at(seconds: u64, now: Timestamp) -> Self {
        // Lengths `parse` refuses can still be built by hand; clamp them rather than
        // count zero buckets or overflow.
        let seconds = seconds.clamp(1, MAX_ROLLING_SECONDS);
        let size = bucket_seconds(seconds);
        let count = seconds.div_ceil(size);
        // Both small after the clamp (size <= 527_040, count <= 60).
        let (size, count) = (size as i64, count as i64);
        // `unix_timestamp` ignores the sub-second part: the truncation of every other window.
        let current = now.unix_timestamp().div_euclid(size);
        Self { seconds, size, oldest: current - (count - 1), current }
    }

    fn key(&self, index: i64) -> String {
        format!("{}{index}", self.key_prefix())
    }

    fn key_prefix(&self) -> String {
        format!("r{}:", self.seconds)
    }
}

/// The monthly period of `anchor` containing `now` (both whole seconds, UTC).
fn monthly(now: Timestamp, anchor: Timestamp) -> Span {
    // Period k starts in the k-th month after the anchor's, so the period of `now`
    // starts in now's month or, if that start is still ahead, the one before.
    let k = month_index(now.date()) - month_index(anchor.date());
    let k = if add_months(anchor, k) > now { k - 1 } else { k };
    Span { start: add_months(anchor, k), end: Some(add_months(anchor, k + 1)) }
}

/// `anchor` moved by `months`: same time of day, same day of month clamped to the
/// target month. Always from the anchor itself, so a 31st never drifts to the 28th.
fn add_months(anchor: Timestamp, months: i32) -> Timestamp {
    let index = month_index(anchor.date()) + months;
    let year = index.div_euclid(12);
    let month = Month::try_from(index.rem_euclid(12) as u8 + 1).expect("month 1 to 12");
    let day = anchor.day().min(month.length(year));
    Date::from_calendar_date(year, month, day).expect(OUT_OF_RANGE).with_time(anchor.time()).assume_utc()
}

/// Months since January of year 0.
fn month_index(date: Date) -> i32 {
    date.year() * 12 + i32::from(u8::from(date.month())) - 1
}

fn whole_second(t: Timestamp) -> Timestamp {
    t.to_offset(UtcOffset::UTC).truncate_to_second()
}

fn unix(seconds: i64) -> Timestamp {
    Timestamp::from_unix_timestamp(seconds).expect(OUT_OF_RANGE)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use time::Duration;
    use time::macros::{date, datetime};

    const ALL: [Window; 5] =
        [Window::Day, Window::Month, Window::BillingPeriod, Window::Lifetime, Window::Rolling { seconds: 3600 }];

    fn both(start: Timestamp, end: Timestamp) -> Span {
        Span { start, end: Some(end) }
    }

    #[test]
    fn text_form_round_trips_and_refuses_nonsense() {
        for w in ALL {
            assert_eq!(Window::parse(&w.as_string()), Ok(w));
            let json = serde_json::to_string(&w).unwrap();
            assert_eq!(json, format!("\"{w}\""));
            assert_eq!(serde_json::from_str::<Window>(&json).unwrap(), w);
        }
        assert_eq!(Window::parse("rolling:3600"), Ok(Window::Rolling { seconds: 3600 }));
        assert_eq!(Window::parse("rolling:31622400"), Ok(Window::Rolling { seconds: MAX_ROLLING_SECONDS }));
        for bad in ["rolling:0", "rolling:31622401", "rolling:", "rolling:-5", "rolling:+5", "rolling:1h", "rolling: 5"]
        {
            assert_eq!(Window::parse(bad), Err(WindowError::Rolling(bad.into())), "{bad}");
        }
        for bad in ["", "Day", "weekly", "rolling", "billing-period"] {
            assert_eq!(Window::parse(bad), Err(WindowError::Unknown(bad.into())), "{bad}");
        }
        assert!(serde_json::from_str::<Window>("\"rolling:0\"").is_err());
    }

    #[test]
    fn day_and_month_boundaries() {
        let now = datetime!(2026-11-23 13:45:10.5 UTC);
        assert_eq!(span(Window::Day, now, None), both(datetime!(2026-11-23 0:00 UTC), datetime!(2026-11-24 0:00 UTC)));
        assert_eq!(key(Window::Day, now, None), "d:2026-11-23");
        // The hand-written keys are exactly `format!`'s, early years included.
        for date in [date!(0001 - 01 - 01), date!(0999 - 12 - 31), date!(2026 - 02 - 28), date!(9999 - 12 - 31)] {
            let at = date.midnight().assume_utc();
            for w in [Window::Day, Window::Month] {
                assert_eq!(key(w, at, None), fmt_key(w, date));
            }
        }
        assert_eq!(
            span(Window::Month, now, None),
            both(datetime!(2026-11-01 0:00 UTC), datetime!(2026-12-01 0:00 UTC))
        );
        assert_eq!(key(Window::Month, now, None), "m:2026-11");

        // The last nanosecond of a day is still that day; midnight is the next.
        let last = datetime!(2026-11-23 23:59:59.999_999_999 UTC);
        assert_eq!(key(Window::Day, last, None), "d:2026-11-23");
        assert_eq!(key(Window::Day, datetime!(2026-11-24 0:00 UTC), None), "d:2026-11-24");
        assert_eq!(resets_at(Window::Day, last, None), Some(datetime!(2026-11-24 0:00 UTC)));

        // A non-UTC offset is the same instant.
        let paris = datetime!(2026-12-01 00:30 +1);
        assert_eq!(key(Window::Month, paris, None), "m:2026-11");
        assert_eq!(key(Window::Lifetime, paris, None), "l");
        assert_eq!(resets_at(Window::Lifetime, paris, None), None);
    }

    #[test]
    fn december_rolls_into_january() {
        let now = datetime!(2026-12-31 23:59:59.9 UTC);
        assert_eq!(span(Window::Day, now, None).end, Some(datetime!(2027-01-01 0:00 UTC)));
        assert_eq!(
            span(Window::Month, now, None),
            both(datetime!(2026-12-01 0:00 UTC), datetime!(2027-01-01 0:00 UTC))
        );
        assert_eq!(key(Window::Month, datetime!(2027-01-01 0:00 UTC), None), "m:2027-01");
        let anchor = Some(datetime!(2025-06-15 08:00 UTC));
        assert_eq!(
            span(Window::BillingPeriod, datetime!(2026-12-20 0:00 UTC), anchor),
            both(datetime!(2026-12-15 08:00 UTC), datetime!(2027-01-15 08:00 UTC))
        );
    }

    #[test]
    fn leap_day() {
        let now = datetime!(2028-02-29 12:00 UTC);
        assert_eq!(span(Window::Day, now, None), both(datetime!(2028-02-29 0:00 UTC), datetime!(2028-03-01 0:00 UTC)));
        assert_eq!(key(Window::Day, now, None), "d:2028-02-29");
        assert_eq!(
            span(Window::Month, now, None),
            both(datetime!(2028-02-01 0:00 UTC), datetime!(2028-03-01 0:00 UTC))
        );
    }

    /// The ends of the first `n` billing periods, walking from the anchor.
    fn period_ends(anchor: Timestamp, n: usize) -> Vec<Timestamp> {
        let mut now = anchor;
        (0..n)
            .map(|_| {
                now = resets_at(Window::BillingPeriod, now, Some(anchor)).unwrap();
                now
            })
            .collect()
    }

    #[test]
    fn billing_periods_from_the_31st_never_drift() {
        let ends = period_ends(datetime!(2028-01-31 0:00 UTC), 6);
        let expected = [
            datetime!(2028-02-29 0:00 UTC),
            datetime!(2028-03-31 0:00 UTC),
            datetime!(2028-04-30 0:00 UTC),
            datetime!(2028-05-31 0:00 UTC),
            datetime!(2028-06-30 0:00 UTC),
            datetime!(2028-07-31 0:00 UTC),
        ];
        assert_eq!(ends, expected);
        assert_eq!(period_ends(datetime!(2027-01-31 0:00 UTC), 2)[0], datetime!(2027-02-28 0:00 UTC));
        assert_eq!(period_ends(datetime!(2027-01-31 0:00 UTC), 2)[1], datetime!(2027-03-31 0:00 UTC));
    }

    #[test]
    fn billing_period_anchored_on_a_leap_day() {
        let anchor = Some(datetime!(2024-02-29 0:00 UTC));
        let feb = both(datetime!(2025-02-28 0:00 UTC), datetime!(2025-03-29 0:00 UTC));
        assert_eq!(span(Window::BillingPeriod, datetime!(2025-03-10 0:00 UTC), anchor), feb);
        assert_eq!(span(Window::BillingPeriod, datetime!(2025-02-28 0:00 UTC), anchor), feb);
        assert_eq!(
            span(Window::BillingPeriod, datetime!(2025-02-27 23:59:59 UTC), anchor),
            both(datetime!(2025-01-29 0:00 UTC), datetime!(2025-02-28 0:00 UTC))
        );
    }

    #[test]
    fn billing_period_keeps_the_anchor_time_of_day() {
        // Sub-second parts of the anchor are dropped like those of `now`.
        let anchor = Some(datetime!(2026-01-10 15:30:00.75 UTC));
        let before = datetime!(2026-03-10 15:29:59.999 UTC);
        let at = datetime!(2026-03-10 15:30 UTC);
        assert_eq!(
            span(Window::BillingPeriod, before, anchor),
            both(datetime!(2026-02-10 15:30 UTC), datetime!(2026-03-10 15:30 UTC))
        );
        assert_eq!(span(Window::BillingPeriod, at, anchor), both(at, datetime!(2026-04-10 15:30 UTC)));
        assert_eq!(resets_at(Window::BillingPeriod, before, anchor), Some(at));
        assert_eq!(key(Window::BillingPeriod, at, anchor), format!("b:{}", at.unix_timestamp()));
        assert_ne!(key(Window::BillingPeriod, before, anchor), key(Window::BillingPeriod, at, anchor));
    }

    #[test]
    fn billing_period_before_its_anchor_and_without_one() {
        // Periods extend backwards from an anchor in the future, with the same clamping.
        let anchor = Some(datetime!(2026-05-31 0:00 UTC));
        assert_eq!(
            span(Window::BillingPeriod, datetime!(2026-03-15 0:00 UTC), anchor),
            both(datetime!(2026-02-28 0:00 UTC), datetime!(2026-03-31 0:00 UTC))
        );
        let now = datetime!(2026-11-23 13:45 UTC);
        assert_eq!(span(Window::BillingPeriod, now, None), span(Window::Month, now, None));
        assert_eq!(
            key(Window::BillingPeriod, now, None),
            format!("b:{}", datetime!(2026-11-01 0:00 UTC).unix_timestamp())
        );
    }

    #[test]
    fn rolling_buckets_examples() {
        assert_eq!([1, 60, 61, 3600, 86_400].map(bucket_seconds), [1, 1, 2, 60, 1440]);
        assert_eq!(bucket_seconds(0), 1);

        let now = datetime!(2026-11-23 12:00:30.5 UTC);
        let current = now.unix_timestamp() / 60;
        let keys = rolling_bucket_keys(3600, now);
        assert_eq!(keys.len(), 60);
        assert_eq!(keys[0], format!("r3600:{}", current - 59));
        assert_eq!(keys[59], format!("r3600:{current}"));
        let hour = Window::Rolling { seconds: 3600 };
        assert_eq!(key(hour, now, None), keys[59]);
        assert_eq!(span(hour, now, None), both(datetime!(2026-11-23 11:01 UTC), datetime!(2026-11-23 12:01 UTC)));
        assert_eq!(resets_at(hour, now, None), Some(datetime!(2026-11-23 12:01 UTC)));

        // 61 seconds: 31 buckets of 2 seconds, 62 seconds in all.
        let s = span(Window::Rolling { seconds: 61 }, now, None);
        assert_eq!(rolling_bucket_keys(61, now).len(), 31);
        assert_eq!(s.end.unwrap() - s.start, Duration::seconds(62));
        assert_eq!(*rolling_bucket_keys(1, now), [format!("r1:{}", now.unix_timestamp())]);
        assert_eq!(rolling_bucket_keys(MAX_ROLLING_SECONDS, now).len(), 60);
        // Lengths `parse` refuses are clamped, not a panic or an empty window.
        assert_eq!(rolling_bucket_keys(0, now), rolling_bucket_keys(1, now));
        assert_eq!(rolling_bucket_keys(u64::MAX, now), rolling_bucket_keys(MAX_ROLLING_SECONDS, now));
    }

    const Y1990: i64 = 631_152_000;
    const Y2100: i64 = 4_102_444_800;

    fn instant() -> impl Strategy<Value = Timestamp> {
        (Y1990..Y2100, 0u32..1_000_000_000).prop_map(|(s, ns)| unix(s).replace_nanosecond(ns).unwrap())
    }

    /// Anchors weighted towards the ends of months, where clamping happens.
    fn anchor() -> impl Strategy<Value = Timestamp> {
        (1990i32..2100, 1u8..=12, prop_oneof![1u8..=31, 28u8..=31], 0u32..86_400, 0u32..1_000_000_000).prop_map(
            |(year, month, day, secs, ns)| {
                let month = Month::try_from(month).unwrap();
                let date = Date::from_calendar_date(year, month, day.min(month.length(year))).unwrap();
                let time =
                    time::Time::from_hms_nano((secs / 3600) as u8, (secs / 60 % 60) as u8, (secs % 60) as u8, ns);
                date.with_time(time.unwrap()).assume_utc()
            },
        )
    }

    fn rolling_seconds() -> impl Strategy<Value = u64> {
        prop_oneof![1u64..=200, 1u64..=MAX_ROLLING_SECONDS]
    }

    fn window() -> impl Strategy<Value = Window> {
        prop_oneof![
            Just(Window::Day),
            Just(Window::Month),
            Just(Window::BillingPeriod),
            Just(Window::Lifetime),
            rolling_seconds().prop_map(|seconds| Window::Rolling { seconds }),
        ]
    }

    proptest! {
        /// `now` is in its span, the span's end starts the next instance (for rolling:
        /// the window slides by one bucket), the key changes exactly there, and the
        /// window resets when its span ends.
        #[test]
        fn spans_contain_now_and_follow_each_other(
            w in window(),
            now in instant(),
            anchor in proptest::option::of(anchor()),
        ) {
            let s = span(w, now, anchor);
            prop_assert!(s.start <= now);
            prop_assert_eq!(resets_at(w, now, anchor), s.end);
            prop_assert_eq!(Window::parse(&w.as_string()), Ok(w));
            let Some(end) = s.end else {
                prop_assert_eq!(w, Window::Lifetime);
                prop_assert_eq!(key(w, now, anchor), "l");
                return Ok(());
            };
            prop_assert!(now < end);
            let next = span(w, end, anchor);
            let k = key(w, now, anchor);
            prop_assert_eq!(&key(w, end - Duration::NANOSECOND, anchor), &k);
            prop_assert_ne!(&key(w, end, anchor), &k);
            if let Window::Rolling { seconds } = w {
                let size = Duration::seconds(bucket_seconds(seconds) as i64);
                prop_assert_eq!(next, both(s.start + size, end + size));
                prop_assert_eq!(&key(w, end - size, anchor), &k);
            } else {
                prop_assert_eq!(next.start, end);
                prop_assert_eq!(&key(w, s.start, anchor), &k);
            }
        }

        /// Two instants share a key exactly when they share a span.
        #[test]
        fn same_key_iff_same_span(
            w in window(),
            now in instant(),
            later in prop_oneof![0i64..200_000_000_000, 0i64..6_048_000_000_000_000],
            anchor in proptest::option::of(anchor()),
        ) {
            let other = now + Duration::nanoseconds(later);
            prop_assert_eq!(
                key(w, now, anchor) == key(w, other, anchor),
                span(w, now, anchor) == span(w, other, anchor)
            );
        }

        /// Billing periods are 28 to 31 days, start at the anchor's time of day, on the
        /// anchor's day of month or the last day of a shorter month; without an anchor
        /// they are calendar months.
        #[test]
        fn billing_periods_follow_the_anchor(now in instant(), anchor in anchor()) {
            let s = span(Window::BillingPeriod, now, Some(anchor));
            let end = s.end.unwrap();
            let days = (end - s.start).whole_days();
            prop_assert!((28..=31).contains(&days), "{days} days: {s:?}");
            prop_assert_eq!(end - s.start, Duration::days(days));
            for t in [s.start, end] {
                prop_assert_eq!(t.day(), anchor.day().min(t.month().length(t.year())));
                prop_assert_eq!(t.time(), anchor.truncate_to_second().time());
            }
            prop_assert_eq!(span(Window::BillingPeriod, now, None), span(Window::Month, now, None));
        }

        #[test]
        fn decimal_digits_match_display(n in any::<i64>()) {
            let mut out = String::from("r60:");
            push_decimal(&mut out, n);
            prop_assert_eq!(out, format!("r60:{n}"));
        }

        /// The counted buckets are consecutive, end with the current one, and cover at
        /// least the window and less than one bucket more.
        #[test]
        fn rolling_buckets_cover_the_window(seconds in rolling_seconds(), now in instant()) {
            let size = bucket_seconds(seconds);
            let keys = rolling_bucket_keys(seconds, now);
            prop_assert_eq!(keys.len() as u64, seconds.div_ceil(size));
            prop_assert!(keys.len() <= 60);
            prop_assert_eq!(keys.last().unwrap(), &key(Window::Rolling { seconds }, now, None));
            let prefix = format!("r{seconds}:");
            let indices: Vec<i64> = keys.iter().map(|k| k.strip_prefix(&prefix).unwrap().parse().unwrap()).collect();
            prop_assert!(indices.windows(2).all(|pair| pair[1] == pair[0] + 1));
            prop_assert_eq!(*indices.last().unwrap(), now.unix_timestamp() / size as i64);

            let s = span(Window::Rolling { seconds }, now, None);
            let covered = (s.end.unwrap() - s.start).whole_seconds() as u64;
            prop_assert_eq!(covered, keys.len() as u64 * size);
            prop_assert!(seconds <= covered && covered < seconds + size, "{covered} for {seconds}");
            prop_assert_eq!(s.start.unix_timestamp(), indices[0] * size as i64);
        }
    }
}
