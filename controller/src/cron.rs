//! Periodic tasks in Elastic Beanstalk's `cron.yaml` format, scheduled by
//! the controller (which runs one at a time, so no leader election is
//! needed), without I/O.
//!
//! ```yaml
//! version: 1
//! cron:
//!   - name: "nightly-report"       # the task's name (X-Aws-Sqsd-Taskname)
//!     url: "/tasks/report"         # the path the agent POSTs to
//!     schedule: "0 3 * * *"        # five fields, UTC
//! ```
//!
//! Each due slot becomes one message on the job queue with the attributes
//! Elastic Beanstalk's own scheduler writes (`beanstalk.sqsd.task_name`,
//! `beanstalk.sqsd.scheduled_time`, `beanstalk.sqsd.path`), so the agent
//! (or sqsd) dispatches it as a periodic task. What was last enqueued per
//! task is remembered in tags on the primary group; a slot is enqueued
//! only when it is later than that. Slots missed between two ticks (ticks
//! more than a minute apart: ordinary jitter, a tick skipped while another
//! controller held the lease) are each sent, oldest first, back to
//! [`CATCH_UP`]; a controller down longer sends those of the last
//! [`CATCH_UP`] only, and says how far its memory was behind.

use std::collections::BTreeMap;

use chrono::{DateTime, Datelike, Duration, Timelike, Utc};
use serde::Deserialize;

/// Message attributes of a periodic task, as Elastic Beanstalk names them.
pub const ATTR_TASK_NAME: &str = "beanstalk.sqsd.task_name";
pub const ATTR_SCHEDULED_AT: &str = "beanstalk.sqsd.scheduled_time";
pub const ATTR_PATH: &str = "beanstalk.sqsd.path";
/// The body Elastic Beanstalk's scheduler sends (the app gets no body).
pub const BODY: &str = "elasticbeanstalk scheduled job";
/// Tag prefix of the memory: `spotguard:cron:<name>` = last slot enqueued.
pub const TAG_PREFIX: &str = "spotguard:cron:";
/// How far back a slot is looked for: a schedule with no slot in a year
/// (say `0 0 30 2 *`) never fires.
const LOOKBACK_MINUTES: i64 = 366 * 24 * 60;
/// At most this many tasks: each keeps one tag on the primary group, and a
/// group holds at most 50 tags (Auto Scaling's quota), some of them the
/// user's.
pub const MAX_TASKS: usize = 20;

/// One task of `cron.yaml`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Task {
    pub name: String,
    pub path: String,
    pub schedule: Schedule,
}

/// A five-field cron expression: minute, hour, day of month, month, day of
/// week (0 or 7 = Sunday), each `*`, a number, a name (`JAN`, `MON`), a
/// range `a-b`, a step `*/n` or `a-b/n`, or a comma list of these. As in
/// Vixie cron, when both the day of month and the day of week are
/// restricted, a day matching either is a slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Schedule {
    text: String,
    minutes: u64,
    hours: u64,
    days: u64,
    months: u64,
    weekdays: u64,
    days_any: bool,
    weekdays_any: bool,
}

const MONTHS: [&str; 12] = [
    "JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC",
];
const WEEKDAYS: [&str; 7] = ["SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"];

fn field(text: &str, what: &str, lo: u32, hi: u32, names: &[&str]) -> Result<u64, String> {
    let value = |s: &str| -> Result<u32, String> {
        if let Some(i) = names.iter().position(|n| n.eq_ignore_ascii_case(s)) {
            // Names count from the field's low end (JAN = 1, SUN = 0).
            return Ok(lo + i as u32);
        }
        s.parse::<u32>().map_err(|_| {
            format!(
                "{what}: {s:?} is not a number{}",
                if names.is_empty() { "" } else { " or a name" }
            )
        })
    };
    let mut bits = 0u64;
    for part in text.split(',') {
        let (range, step) = match part.split_once('/') {
            Some((r, s)) => {
                let step: u32 = s
                    .parse()
                    .map_err(|_| format!("{what}: step {s:?} is not a number"))?;
                if step == 0 {
                    return Err(format!("{what}: step must be at least 1"));
                }
                (r, step)
            }
            None => (part, 1),
        };
        let (a, b) = match range {
            "*" => (lo, hi),
            r => match r.split_once('-') {
                Some((a, b)) => (value(a)?, value(b)?),
                None if part.contains('/') => (value(r)?, hi),
                None => {
                    let v = value(r)?;
                    (v, v)
                }
            },
        };
        // Day of week 7 is Sunday too.
        let top = if what == "day of week" { 7 } else { hi };
        if a < lo || b > top || a > b {
            return Err(format!("{what}: {part:?} is outside {lo}-{top}"));
        }
        let mut v = a;
        while v <= b {
            let bit = if what == "day of week" && v == 7 {
                0
            } else {
                v
            };
            bits |= 1 << bit;
            let Some(next) = v.checked_add(step) else {
                break;
            };
            v = next;
        }
    }
    Ok(bits)
}

/// Whether value `v` is in a field's bit set.
fn has(bits: u64, v: u32) -> bool {
    bits & (1 << v) != 0
}

impl Schedule {
    pub fn parse(text: &str) -> Result<Schedule, String> {
        let f: Vec<&str> = text.split_whitespace().collect();
        if f.len() != 5 {
            return Err(format!(
                "{text:?} has {} fields; expected five (minute hour day-of-month month day-of-week)",
                f.len()
            ));
        }
        Ok(Schedule {
            text: text.to_string(),
            minutes: field(f[0], "minute", 0, 59, &[])?,
            hours: field(f[1], "hour", 0, 23, &[])?,
            days: field(f[2], "day of month", 1, 31, &[])?,
            months: field(f[3], "month", 1, 12, &MONTHS)?,
            weekdays: field(f[4], "day of week", 0, 6, &WEEKDAYS)?,
            // As Vixie cron: a field starting with `*` (`*/2` too) does
            // not restrict the day.
            days_any: f[2].starts_with('*'),
            weekdays_any: f[4].starts_with('*'),
        })
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Whether the minute starting at `t` is a slot.
    pub fn matches(&self, t: DateTime<Utc>) -> bool {
        has(self.minutes, t.minute())
            && has(self.hours, t.hour())
            && has(self.months, t.month())
            && self.matches_day(t)
    }

    fn matches_day(&self, t: DateTime<Utc>) -> bool {
        let day = has(self.days, t.day());
        let weekday = has(self.weekdays, t.weekday().num_days_from_sunday());
        match (self.days_any, self.weekdays_any) {
            (false, false) => day || weekday,
            _ => day && weekday,
        }
    }

    /// The latest slot at or before `now` (whole minutes), if one is within
    /// the look-back. Whole days and hours that cannot match are skipped, so
    /// a yearly schedule costs a few hundred steps, not half a million.
    pub fn latest(&self, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let mut t = now.with_second(0)?.with_nanosecond(0)?;
        let floor = t - Duration::minutes(LOOKBACK_MINUTES);
        // Each step goes back at least a minute, so the window bounds the
        // steps; the bound also turns a wrong step (forward) into `None`
        // rather than a search that never ends.
        let mut steps = 0i64;
        while t >= floor && steps <= LOOKBACK_MINUTES {
            steps += 1;
            if !has(self.months, t.month()) || !self.matches_day(t) {
                t = t.with_hour(0)?.with_minute(0)? - Duration::minutes(1);
            } else if !has(self.hours, t.hour()) {
                t = t.with_minute(0)? - Duration::minutes(1);
            } else if has(self.minutes, t.minute()) {
                return Some(t);
            } else {
                t -= Duration::minutes(1);
            }
        }
        None
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    version: Option<u32>,
    #[serde(default)]
    cron: Vec<Entry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    name: Option<String>,
    url: Option<String>,
    schedule: Option<String>,
}

/// Reads `cron.yaml` text; an error names the entry and the field.
pub fn parse(text: &str) -> Result<Vec<Task>, String> {
    let file: File = serde_norway::from_str(text).map_err(|e| format!("not a cron.yaml: {e}"))?;
    if file.version != Some(1) {
        return Err(format!(
            "`version`: expected 1, got {}",
            file.version
                .map_or("nothing".to_string(), |v| v.to_string())
        ));
    }
    if file.cron.len() > MAX_TASKS {
        return Err(format!(
            "`cron`: {} tasks; at most {MAX_TASKS} (each is remembered in a tag of the primary group, which holds 50)",
            file.cron.len()
        ));
    }
    let mut tasks: Vec<Task> = Vec::new();
    for (i, e) in file.cron.into_iter().enumerate() {
        let at = |field: &str, name: &Option<String>| match name {
            Some(n) => format!("cron[{i}] ({n:?}): `{field}`"),
            None => format!("cron[{i}]: `{field}`"),
        };
        let name = match &e.name {
            // It travels as an HTTP header (X-Aws-Sqsd-Taskname): printable
            // ASCII, no space at either end.
            Some(n)
                if !n.is_empty()
                    && n.len() <= 80
                    && n.trim() == n
                    && n.bytes().all(|b| (0x20..0x7f).contains(&b)) =>
            {
                n.clone()
            }
            _ => {
                return Err(format!(
                    "{}: a name of 1 to 80 printable ASCII characters, no space at either end, is required",
                    at("name", &e.name)
                ))
            }
        };
        if tasks.iter().any(|t| t.name == name) {
            return Err(format!("{}: the name is used twice", at("name", &e.name)));
        }
        let path = match &e.url {
            Some(u)
                if u.starts_with('/')
                    && !u.starts_with("//")
                    && !u.contains('\\')
                    && !u.contains("://")
                    && !u.contains(|c: char| c.is_whitespace() || c.is_control()) =>
            {
                u.clone()
            }
            Some(u) => {
                return Err(format!(
                    "{}: {u:?} is not a path starting with /",
                    at("url", &e.name)
                ))
            }
            None => return Err(format!("{}: required", at("url", &e.name))),
        };
        let schedule = match &e.schedule {
            Some(s) => {
                Schedule::parse(s).map_err(|m| format!("{}: {m}", at("schedule", &e.name)))?
            }
            None => return Err(format!("{}: required", at("schedule", &e.name))),
        };
        tasks.push(Task {
            name,
            path,
            schedule,
        });
    }
    Ok(tasks)
}

/// How far back missed slots are still sent: 10 minutes covers a
/// Lambda tick late or skipped (the one-minute schedule, a lease held by a
/// holder that died: `lease.hold`, 60 s) several times over, and bounds
/// what a controller back from a long outage sends at once (10 slots of a
/// per-minute task), so that it does not flood the queue with a night of
/// stale slots.
pub const CATCH_UP: Duration = Duration::minutes(10);

/// A slot to enqueue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Due {
    pub name: String,
    pub path: String,
    pub at: DateTime<Utc>,
}

/// The memory tag of a task.
pub fn tag_of(name: &str) -> String {
    format!("{TAG_PREFIX}{name}")
}

/// What is due at `now`, and the memory to write once it is enqueued.
/// A task never seen before starts from its latest slot without firing it
/// (a schedule added at 15:00 does not run its 03:00 slot); a task whose
/// latest slot is later than the one remembered fires each slot after the
/// remembered one within [`CATCH_UP`], oldest first, once.
pub fn due(
    tasks: &[Task],
    tags: &BTreeMap<String, String>,
    now: DateTime<Utc>,
) -> (Vec<Due>, BTreeMap<String, String>) {
    let mut out = Vec::new();
    let mut memory = BTreeMap::new();
    let minute = |t: DateTime<Utc>| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    for t in tasks {
        let last = tags
            .get(&tag_of(&t.name))
            .and_then(|v| DateTime::parse_from_rfc3339(v).ok())
            .map(|d| d.with_timezone(&Utc));
        // A slot ahead of now was not written by a controller (it writes
        // only slots it enqueued): it would silence the task until then.
        let ahead = now
            .checked_add_signed(crate::reconcile::CLOCK_SKEW)
            .unwrap_or(DateTime::<Utc>::MAX_UTC);
        let last = match last {
            Some(l) if l > ahead => {
                tracing::warn!(tag = %tag_of(&t.name), value = %l, "a remembered slot later than now; ignored");
                None
            }
            l => l,
        };
        let Some(slot) = t.schedule.latest(now) else {
            // No slot within the look-back (a 29 February task): seen now,
            // so that its first slot fires rather than counting as a
            // first sight.
            if last.is_none() {
                memory.insert(tag_of(&t.name), minute(now));
            }
            continue;
        };
        match last {
            Some(last) if slot <= last => continue,
            Some(last) => {
                let window = slot - CATCH_UP;
                if last < window {
                    tracing::warn!(task = %t.name, remembered = %minute(last), sent_from = %minute(window), "periodic slots older than the catch-up window are not sent");
                }
                // Whole minutes after the later of the two, up to the slot:
                // at most CATCH_UP's minutes, so bounded.
                let Some(mut m) = last
                    .max(window)
                    .with_second(0)
                    .and_then(|m| m.with_nanosecond(0))
                else {
                    continue;
                };
                while m < slot {
                    m += Duration::minutes(1);
                    if t.schedule.matches(m) {
                        out.push(Due {
                            name: t.name.clone(),
                            path: t.path.clone(),
                            at: m,
                        });
                    }
                }
            }
            None => {}
        }
        memory.insert(tag_of(&t.name), minute(slot));
    }
    (out, memory)
}

/// FNV-1a, 64 bits: a stable id for a task name in SQS's character set.
fn name_hash(name: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// A slot's message on a FIFO queue: (group id, deduplication id), both
/// from a hash of the name (names are free text; SQS takes only
/// alphanumerics and punctuation there), the deduplication id the same for
/// every try of the same slot.
pub fn fifo_ids(d: &Due) -> (String, String) {
    let h = name_hash(&d.name);
    (
        format!("cron-{h}"),
        format!("cron-{h}-{}", d.at.timestamp()),
    )
}

/// A slot's message attributes.
pub fn message_of(d: &Due) -> BTreeMap<String, String> {
    let mut attrs = BTreeMap::new();
    attrs.insert(ATTR_TASK_NAME.to_string(), d.name.clone());
    attrs.insert(
        ATTR_SCHEDULED_AT.to_string(),
        d.at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
    );
    attrs.insert(ATTR_PATH.to_string(), d.path.clone());
    attrs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_checks_that_mutants_found_untested() {
        // `start/step` without a range runs from start to the field's end.
        let s = Schedule::parse("5/20 * * * *").unwrap();
        assert_eq!(s.minutes, (1 << 5) | (1 << 25) | (1 << 45));
        assert_eq!(s.as_str(), "5/20 * * * *");
        // At most 20 tasks: 20 pass, 21 are refused with the count.
        let tasks = |n: usize| {
            let mut y = "version: 1\ncron:\n".to_string();
            for k in 0..n {
                y.push_str(&format!(
                    " - name: t{k}\n   url: /t\n   schedule: \"0 * * * *\"\n"
                ));
            }
            parse(&y)
        };
        assert_eq!(tasks(20).map(|t| t.len()), Ok(20));
        assert!(tasks(21).is_err_and(|e| e.contains("21 tasks")));
        // A control character that is not whitespace is refused in a path.
        let bell = parse(
            "version: 1\ncron:\n - name: b\n   url: \"/a\\u0007b\"\n   schedule: \"0 * * * *\"\n",
        );
        assert!(bell.is_err(), "{bell:?}");
        // FNV-1a, 64 bits, as published (the FIFO ids depend on it).
        assert_eq!(name_hash(""), "cbf29ce484222325");
        assert_eq!(name_hash("a"), "af63dc4c8601ec8c");
    }

    fn t(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn expressions() {
        let s = Schedule::parse("*/15 9-17 * * MON-FRI").unwrap();
        assert!(s.matches(t("2026-11-30T09:45:00Z")), "Monday 09:45");
        assert!(!s.matches(t("2026-11-29T09:45:00Z")), "Sunday");
        assert!(!s.matches(t("2026-11-30T18:00:00Z")));
        assert!(!s.matches(t("2026-11-30T09:50:00Z")));
        // Day of month or day of week when both are restricted (Vixie cron).
        let s = Schedule::parse("0 0 1 * 0").unwrap();
        assert!(s.matches(t("2026-12-01T00:00:00Z")), "the 1st, a Tuesday");
        assert!(s.matches(t("2026-11-29T00:00:00Z")), "a Sunday");
        assert!(!s.matches(t("2026-11-30T00:00:00Z")));
        // 7 is Sunday; names are case-insensitive.
        assert!(Schedule::parse("0 0 * jan 7")
            .unwrap()
            .matches(t("2026-01-04T00:00:00Z")));
        for (bad, says) in [
            ("* * * *", "five"),
            ("60 * * * *", "minute"),
            ("* 24 * * *", "hour"),
            ("* * 0 * *", "day of month"),
            ("* * * 13 *", "month"),
            ("*/0 * * * *", "step"),
            ("* * * * FUNDAY", "day of week"),
            ("5-1 * * * *", "outside"),
        ] {
            let e = Schedule::parse(bad).unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
        assert_eq!(
            Schedule::parse("30 2 * * *")
                .unwrap()
                .latest(t("2026-11-29T08:15:42Z")),
            Some(t("2026-11-29T02:30:00Z"))
        );
        assert_eq!(
            Schedule::parse("0 0 30 2 *")
                .unwrap()
                .latest(t("2026-11-29T08:15:42Z")),
            None
        );
        // A yearly slot is found across the year (the scan skips days).
        assert_eq!(
            Schedule::parse("15 4 2 1 *")
                .unwrap()
                .latest(t("2026-11-29T08:15:42Z")),
            Some(t("2026-01-02T04:15:00Z"))
        );
        // `*/2` in a day field does not restrict it (Vixie cron): odd days
        // that are Mondays, not odd days or Mondays.
        let s = Schedule::parse("0 0 */2 * MON").unwrap();
        assert!(s.matches(t("2026-11-23T00:00:00Z")), "the 23rd, a Monday");
        assert!(!s.matches(t("2026-11-30T00:00:00Z")), "a Monday, even day");
        assert!(
            !s.matches(t("2026-11-25T00:00:00Z")),
            "odd day, a Wednesday"
        );
        // A huge step cannot overflow.
        assert!(Schedule::parse("0/4294967295 * * * *")
            .unwrap()
            .matches(t("2026-11-29T08:00:00Z")));
    }

    #[test]
    fn a_task_with_no_slot_yet_fires_at_its_first_one() {
        let tasks =
            parse("version: 1\ncron:\n - name: leap\n   url: /leap\n   schedule: \"0 0 29 2 *\"\n")
                .unwrap();
        let (d, m) = due(&tasks, &BTreeMap::new(), t("2026-11-29T08:00:00Z"));
        assert!(d.is_empty());
        let (d, _) = due(&tasks, &m, t("2028-02-29T00:00:30Z"));
        assert_eq!(d.len(), 1, "fired in 2028, not skipped as a first sight");
    }

    #[test]
    fn fifo_ids_are_valid_and_distinct_for_any_name() {
        let at = t("2026-11-29T10:05:00Z");
        let d = |name: &str| Due {
            name: name.into(),
            path: "/x".into(),
            at,
        };
        let ids: Vec<(String, String)> =
            ["nightly report", "nightly_report", "nightly-report!", "a"]
                .iter()
                .map(|n| fifo_ids(&d(n)))
                .collect();
        for (g, dd) in &ids {
            for id in [g, dd] {
                assert!(
                    id.len() <= 128 && id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'),
                    "{id}"
                );
            }
        }
        let groups: std::collections::BTreeSet<_> = ids.iter().map(|i| &i.0).collect();
        assert_eq!(groups.len(), 4, "{ids:?}");
    }

    #[test]
    fn cron_yaml_errors_name_the_entry_and_the_field() {
        let ok = "version: 1\ncron:\n - name: \"backup\"\n   url: \"/backup\"\n   schedule: \"0 */12 * * *\"\n";
        let tasks = parse(ok).unwrap();
        assert_eq!(tasks[0].name, "backup");
        assert_eq!(tasks[0].path, "/backup");
        for (text, says) in [
            ("version: 2\ncron: []\n", "`version`"),
            ("cron: []\n", "`version`"),
            ("version: 1\ncron:\n - name: a\n   url: /a\n   schedule: \"61 * * * *\"\n", "cron[0] (\"a\"): `schedule`: minute"),
            ("version: 1\ncron:\n - name: a\n   url: a\n   schedule: \"* * * * *\"\n", "cron[0] (\"a\"): `url`"),
            ("version: 1\ncron:\n - name: a\n   url: //evil/x\n   schedule: \"* * * * *\"\n", "cron[0] (\"a\"): `url`"),
            ("version: 1\ncron:\n - url: /a\n   schedule: \"* * * * *\"\n", "cron[0]: `name`"),
            ("version: 1\ncron:\n - name: \"rapport \u{e9}t\u{e9}\"\n   url: /a\n   schedule: \"* * * * *\"\n", "printable ASCII"),
            ("version: 1\ncron:\n - name: \" padded\"\n   url: /a\n   schedule: \"* * * * *\"\n", "no space at either end"),
            ("version: 1\ncron:\n - name: a\n   url: /a\n   schedule: \"* * * * *\"\n - name: a\n   url: /b\n   schedule: \"* * * * *\"\n", "cron[1] (\"a\"): `name`: the name is used twice"),
            ("version: 1\ncron:\n - name: a\n   url: /a\n", "cron[0] (\"a\"): `schedule`: required"),
            ("version: 1\ncron:\n - name: a\n   url: /a\n   schedule: \"* * * * *\"\n   method: GET\n", "method"),
            ("{{{", "not a cron.yaml"),
        ] {
            let e = parse(text).unwrap_err();
            assert!(e.contains(says), "{text:?}: {e}");
        }
    }

    fn minute_by_minute(tasks: &[Task], from: &str, minutes: i64) -> Vec<Due> {
        let mut tags = BTreeMap::new();
        let mut fired = Vec::new();
        let start = t(from);
        for m in 0..minutes {
            // A tick somewhere within each minute, as the schedule rule sends.
            let now = start + Duration::minutes(m) + Duration::seconds(17);
            let (due, memory) = due(tasks, &tags, now);
            fired.extend(due);
            tags.extend(memory);
        }
        fired
    }

    #[test]
    fn each_slot_gives_one_message_in_virtual_time() {
        let tasks = parse("version: 1\ncron:\n - name: five\n   url: /five\n   schedule: \"*/5 * * * *\"\n - name: hourly\n   url: /hourly\n   schedule: \"0 * * * *\"\n").unwrap();
        // Three hours from 10:02: the first look records 10:00 without firing.
        let fired = minute_by_minute(&tasks, "2026-11-29T10:02:00Z", 180);
        let five: Vec<_> = fired
            .iter()
            .filter(|d| d.name == "five")
            .map(|d| d.at)
            .collect();
        let hourly: Vec<_> = fired
            .iter()
            .filter(|d| d.name == "hourly")
            .map(|d| d.at)
            .collect();
        assert_eq!(five.len(), 36, "10:05 .. 13:00 every 5 minutes");
        assert_eq!(five[0], t("2026-11-29T10:05:00Z"));
        assert_eq!(*five.last().unwrap(), t("2026-11-29T13:00:00Z"));
        assert!(five.windows(2).all(|w| w[1] - w[0] == Duration::minutes(5)));
        assert_eq!(
            hourly,
            [
                t("2026-11-29T11:00:00Z"),
                t("2026-11-29T12:00:00Z"),
                t("2026-11-29T13:00:00Z")
            ]
        );
        // Ticks twice a minute: still one message per slot.
        let mut tags = BTreeMap::new();
        let mut n = 0;
        for s in 0..(60 * 60 / 30) {
            let (d, m) = due(
                &tasks[..1],
                &tags,
                t("2026-11-29T10:02:00Z") + Duration::seconds(30 * s),
            );
            n += d.len();
            tags.extend(m);
        }
        assert_eq!(n, 12);
    }

    /// One task, `five`, at `/five` every five minutes.
    fn every_five_minutes() -> Vec<Task> {
        parse("version: 1\ncron:\n - name: five\n   url: /five\n   schedule: \"*/5 * * * *\"\n")
            .unwrap()
    }

    #[test]
    fn a_slot_remembered_ahead_of_now_does_not_silence_the_task() {
        let tasks = every_five_minutes();
        let mut tags = BTreeMap::new();
        // Written by someone with tag rights: a slot a year ahead.
        tags.insert(tag_of("five"), "2027-11-29T10:05:00Z".to_string());
        let (d, m) = due(&tasks, &tags, t("2026-11-29T12:31:05Z"));
        // Taken as a first sight: the memory is the latest slot again ...
        assert!(d.is_empty());
        assert_eq!(m[&tag_of("five")], "2026-11-29T12:30:00Z");
        tags.extend(m);
        // ... and the next slot fires.
        let (d, _) = due(&tasks, &tags, t("2026-11-29T12:35:05Z"));
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].at, t("2026-11-29T12:35:00Z"));
    }

    #[test]
    fn a_controller_that_was_down_sends_the_slots_of_the_catch_up_window_only() {
        let tasks = every_five_minutes();
        let mut tags = BTreeMap::new();
        tags.insert(tag_of("five"), "2026-11-29T10:05:00Z".to_string());
        // Down from 10:06 to 12:31: 29 slots missed; those of the last 10
        // minutes sent, oldest first (12:20 is at the window's edge: out).
        let (d, m) = due(&tasks, &tags, t("2026-11-29T12:31:05Z"));
        let at: Vec<_> = d.iter().map(|d| d.at).collect();
        assert_eq!(at, [t("2026-11-29T12:25:00Z"), t("2026-11-29T12:30:00Z")]);
        assert_eq!(m[&tag_of("five")], "2026-11-29T12:30:00Z");
        // A retried invocation with the memory not yet written sends the same
        // slots again, with the same deduplication ids.
        let (again, _) = due(&tasks, &tags, t("2026-11-29T12:31:40Z"));
        let ids = |d: &[Due]| d.iter().map(fifo_ids).collect::<Vec<_>>();
        assert_eq!(ids(&again), ids(&d));
        tags.extend(m);
        assert!(due(&tasks, &tags, t("2026-11-29T12:32:00Z")).0.is_empty());
    }

    #[test]
    fn ticks_more_than_a_minute_apart_lose_no_slot_of_a_per_minute_task() {
        let tasks =
            parse("version: 1\ncron:\n - name: m\n   url: /m\n   schedule: \"* * * * *\"\n")
                .unwrap();
        let mut tags = BTreeMap::new();
        tags.insert(tag_of("m"), "2026-11-29T12:00:00Z".to_string());
        let mut sent = Vec::new();
        // Ticks 100 s apart, then one skipped (a lease held by a holder
        // that died): every minute's slot goes out once, in order.
        for now in ["12:01:40", "12:03:20", "12:06:40", "12:07:10"] {
            let (d, m) = due(&tasks, &tags, t(&format!("2026-11-29T{now}Z")));
            sent.extend(d.iter().map(|d| d.at.format("%H:%M").to_string()));
            tags.extend(m);
        }
        assert_eq!(
            sent,
            ["12:01", "12:02", "12:03", "12:04", "12:05", "12:06", "12:07"]
        );
        // A remembered time off the minute (a first sight with no slot in
        // the look-back) still gives whole-minute slots.
        tags.insert(tag_of("m"), "2026-11-29T12:07:30Z".to_string());
        let (d, _) = due(&tasks, &tags, t("2026-11-29T12:09:10Z"));
        let at: Vec<_> = d.iter().map(|d| d.at).collect();
        assert_eq!(at, [t("2026-11-29T12:08:00Z"), t("2026-11-29T12:09:00Z")]);
    }
}
