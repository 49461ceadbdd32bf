//! Banking-day calendars and contact hours for the four Nordic jurisdictions.
//!
//! Due dates, payment deadlines and "n banking days after" all depend on when the banks of the
//! debtor's country are closed, which is more than the statutory public holidays: every country
//! also has customary bank closing days (Christmas Eve, New Year's Eve, Midsummer Eve, ...).
//! The holiday definitions are data: one table of rules per country, each with the years it was
//! in force, so a change in law (Store bededag abolished from 2024, Swedish Whit Monday replaced
//! by National Day in 2005) is a visible row, not a branch hidden in code.
//!
//! Contact hours are judged on the debtor's wall clock, so the same instant may be allowed in one
//! country and not in another, and a window start that falls into a daylight-saving gap moves to
//! the first instant that exists.

use std::ops::RangeInclusive;

use chrono::{DateTime, Datelike, NaiveDate, NaiveDateTime, NaiveTime, TimeDelta, TimeZone, Timelike, Utc, Weekday};
use chrono_tz::Tz;
use serde::{Deserialize, Serialize};

use crate::jurisdiction::Jurisdiction;

/// Years for which holidays are computed. Outside this range only weekends close the banks:
/// the tables are not researched beyond it, and guessing would be worse than saying nothing.
pub const SUPPORTED_YEARS: RangeInclusive<i32> = FIRST_YEAR..=LAST_YEAR;

const FIRST_YEAR: i32 = 1900;
const LAST_YEAR: i32 = 2199;

/// Whether a day is closed by law or only by the banks' own agreement. Both close the banks;
/// the difference matters to people reading a schedule, not to banking-day arithmetic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum DayKind {
    PublicHoliday,
    BankClosing,
}

/// A dated holiday or bank closing day in one jurisdiction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub struct Holiday {
    pub date: NaiveDate,
    pub name: &'static str,
    pub local_name: &'static str,
    pub kind: DayKind,
}

/// How a rule finds its date in a given year.
#[derive(Debug, Clone, Copy)]
enum DateRule {
    Fixed {
        month: u32,
        day: u32,
    },
    /// Days relative to Easter Sunday.
    Easter {
        offset: i64,
    },
    /// The first `weekday` on or after `month`/`day`, i.e. "the Saturday between 20 and 26 June"
    /// is `WeekdayFrom { weekday: Sat, month: 6, day: 20 }`. The range may cross a month end.
    WeekdayFrom {
        weekday: Weekday,
        month: u32,
        day: u32,
    },
}

impl DateRule {
    fn resolve(self, year: i32, easter: NaiveDate) -> Option<NaiveDate> {
        match self {
            DateRule::Fixed { month, day } => NaiveDate::from_ymd_opt(year, month, day),
            DateRule::Easter { offset } => easter.checked_add_signed(TimeDelta::try_days(offset)?),
            DateRule::WeekdayFrom { weekday, month, day } => {
                let start = NaiveDate::from_ymd_opt(year, month, day)?;
                let ahead = (7 + weekday.num_days_from_monday() - start.weekday().num_days_from_monday()) % 7;
                start.checked_add_signed(TimeDelta::try_days(i64::from(ahead))?)
            }
        }
    }
}

/// One row of a country's holiday table; `from..=to` are the years the rule was in force.
#[derive(Debug, Clone, Copy)]
struct Rule {
    name: &'static str,
    local_name: &'static str,
    kind: DayKind,
    date: DateRule,
    from: i32,
    to: i32,
}

impl Rule {
    const fn since(self, year: i32) -> Rule {
        Rule { from: year, ..self }
    }

    const fn until(self, year: i32) -> Rule {
        Rule { to: year, ..self }
    }

    const fn between(self, from: i32, to: i32) -> Rule {
        Rule { from, to, ..self }
    }
}

const fn public(name: &'static str, local_name: &'static str, date: DateRule) -> Rule {
    Rule {
        name,
        local_name,
        kind: DayKind::PublicHoliday,
        date,
        from: FIRST_YEAR,
        to: LAST_YEAR,
    }
}

const fn bank(name: &'static str, local_name: &'static str, date: DateRule) -> Rule {
    Rule {
        name,
        local_name,
        kind: DayKind::BankClosing,
        date,
        from: FIRST_YEAR,
        to: LAST_YEAR,
    }
}

const fn fixed(month: u32, day: u32) -> DateRule {
    DateRule::Fixed { month, day }
}

const fn easter(offset: i64) -> DateRule {
    DateRule::Easter { offset }
}

const fn weekday_from(weekday: Weekday, month: u32, day: u32) -> DateRule {
    DateRule::WeekdayFrom { weekday, month, day }
}

// Denmark.
// Bank closing days: Danmarks Nationalbank, "Banklukkedage"
// (https://www.nationalbanken.dk/da/vores-arbejde/stabile-priser-pengepolitik-og-dansk-oekonomi/banklukkedage),
// which for 2026 and 2027 lists the public holidays plus "Banklukkedag" on the Friday after
// Ascension, 5 June and 31 December, and Juleaftensdag. Store bededag: abolished as a public holiday
// from 2024 by the 2023 act on its abolition; the last one was 2023-05-05. The Friday after
// Ascension is absent from the Danish Bankers' Association list for 2006 and present from 2016
// on; 2009 as its first year comes from a QuantLib port (libitofin) and is not independently
// verified. 1 May is not a bank closing day (absent from Nationalbanken's list).
const DK_RULES: &[Rule] = &[
    public("New Year's Day", "Nytårsdag", fixed(1, 1)),
    public("Maundy Thursday", "Skærtorsdag", easter(-3)),
    public("Good Friday", "Langfredag", easter(-2)),
    public("Easter Sunday", "Påskedag", easter(0)),
    public("Easter Monday", "2. påskedag", easter(1)),
    public("Great Prayer Day", "Store bededag", easter(26)).until(2023),
    public("Ascension Day", "Kristi himmelfartsdag", easter(39)),
    bank(
        "Day after Ascension Day",
        "Fredag efter Kristi himmelfartsdag",
        easter(40),
    )
    .since(2009),
    public("Whit Sunday", "Pinsedag", easter(49)),
    public("Whit Monday", "2. pinsedag", easter(50)),
    bank("Constitution Day", "Grundlovsdag", fixed(6, 5)),
    bank("Christmas Eve", "Juleaftensdag", fixed(12, 24)),
    public("Christmas Day", "Juledag", fixed(12, 25)),
    public("Boxing Day", "2. juledag", fixed(12, 26)),
    bank("New Year's Eve", "Nytårsaftensdag", fixed(12, 31)),
];

// Norway.
// Bank closing days: Norges Bank, settlement days of its settlement system NBO ("Oppgjørsdager",
// https://www.norges-bank.no/Bank-og-marked/Norges-Banks-oppgjorssystem/Oppgjorsdager/Oppgjorsdager-2017/
// and the English "Settlement days" page for 2019): the public holidays plus Christmas Eve. New
// Year's Eve is not on Norges Bank's list, so it stays a banking day. Public holidays: the
// Holidays Act (helligdagsloven) and the 1947 act making 1 and 17 May public holidays.
const NO_RULES: &[Rule] = &[
    public("New Year's Day", "Første nyttårsdag", fixed(1, 1)),
    public("Maundy Thursday", "Skjærtorsdag", easter(-3)),
    public("Good Friday", "Langfredag", easter(-2)),
    public("Easter Sunday", "Første påskedag", easter(0)),
    public("Easter Monday", "Andre påskedag", easter(1)),
    public("Labour Day", "Offentlig høytidsdag", fixed(5, 1)).since(1947),
    public("Constitution Day", "Grunnlovsdag", fixed(5, 17)).since(1947),
    public("Ascension Day", "Kristi himmelfartsdag", easter(39)),
    public("Whit Sunday", "Første pinsedag", easter(49)),
    public("Whit Monday", "Andre pinsedag", easter(50)),
    bank("Christmas Eve", "Julaften", fixed(12, 24)),
    public("Christmas Day", "Første juledag", fixed(12, 25)),
    public("Boxing Day", "Andre juledag", fixed(12, 26)),
];

// Sweden.
// Public holidays: Lag (1989:253) om allmänna helgdagar, as amended by Lag (2004:1320), which made
// National Day a holiday and dropped Whit Monday from 2005. Bank closing days ("bankfria dagar"):
// besides Saturdays and public holidays, Midsummer Eve, Christmas Eve and New Year's Eve, which
// Lag (1930:173) om beräkning av lagstadgad tid treats like public holidays for deadlines
// (Finansportalen's glossary: "Svenska bankfria dagar är lördagar samt midsommarafton, julafton
// och nyårsafton"). Midsummer and All Saints' Day moved to Saturdays in 1953; before that they were
// 24 June and 1 November. 1 May has been a public holiday since 1939.
const SE_RULES: &[Rule] = &[
    public("New Year's Day", "Nyårsdagen", fixed(1, 1)),
    public("Epiphany", "Trettondedag jul", fixed(1, 6)),
    public("Good Friday", "Långfredagen", easter(-2)),
    public("Easter Sunday", "Påskdagen", easter(0)),
    public("Easter Monday", "Annandag påsk", easter(1)),
    public("May Day", "Första maj", fixed(5, 1)).since(1939),
    public("Ascension Day", "Kristi himmelsfärdsdag", easter(39)),
    public("Whit Sunday", "Pingstdagen", easter(49)),
    public("Whit Monday", "Annandag pingst", easter(50)).until(2004),
    public("National Day", "Sveriges nationaldag", fixed(6, 6)).since(2005),
    bank("Midsummer Eve", "Midsommarafton", fixed(6, 23)).until(1952),
    bank("Midsummer Eve", "Midsommarafton", weekday_from(Weekday::Fri, 6, 19)).since(1953),
    public("Midsummer Day", "Midsommardagen", fixed(6, 24)).until(1952),
    public("Midsummer Day", "Midsommardagen", weekday_from(Weekday::Sat, 6, 20)).since(1953),
    public("All Saints' Day", "Alla helgons dag", fixed(11, 1)).until(1952),
    public(
        "All Saints' Day",
        "Alla helgons dag",
        weekday_from(Weekday::Sat, 10, 31),
    )
    .since(1953),
    bank("Christmas Eve", "Julafton", fixed(12, 24)),
    public("Christmas Day", "Juldagen", fixed(12, 25)),
    public("Boxing Day", "Annandag jul", fixed(12, 26)),
    bank("New Year's Eve", "Nyårsafton", fixed(12, 31)),
];

// Finland.
// Bank closing days: the TARGET closing days (New Year's Day, Good Friday, Easter Monday, 1 May,
// 25 and 26 December) plus the national holidays on which Finnish banks do not process payments:
// Epiphany, Ascension Day, Midsummer Eve, Independence Day and Christmas Eve (Bank of Finland list
// as republished by holidaystracker.com for 2015; OP Financial Group's 2024 service calendar;
// Työttömyyskassa YTK, "Opening hours at Christmas and New Year 2021": Christmas Eve and Epiphany
// are not banking days). New Year's Eve and Maundy Thursday are banking days (banks close at 13:00).
// QuantLib puts Midsummer Eve on the Friday between 18 and 24 June; the law puts Midsummer Day on
// the Saturday between 20 and 26 June, so the eve is the Friday between 19 and 25 June.
// History (Wikipedia, "Public holidays in Finland"; Kotus): Midsummer and All Saints' Day moved to
// Saturdays in 1955; Epiphany and Ascension Day were Saturdays from 1973 until they moved back
// (1991 per Wikipedia in English, 1992 per Kotus and Finnish Wikipedia; 1992 is used here).
const FI_RULES: &[Rule] = &[
    public("New Year's Day", "Uudenvuodenpäivä", fixed(1, 1)),
    public("Epiphany", "Loppiainen", fixed(1, 6)).until(1972),
    public("Epiphany", "Loppiainen", weekday_from(Weekday::Sat, 1, 6)).between(1973, 1991),
    public("Epiphany", "Loppiainen", fixed(1, 6)).since(1992),
    public("Good Friday", "Pitkäperjantai", easter(-2)),
    public("Easter Sunday", "Pääsiäispäivä", easter(0)),
    public("Easter Monday", "Toinen pääsiäispäivä", easter(1)),
    public("May Day", "Vappu", fixed(5, 1)),
    public("Ascension Day", "Helatorstai", easter(39)).until(1972),
    // The Saturday before the fifth Sunday after Easter (rukoussunnuntai).
    public("Ascension Day", "Kristuksen taivaaseenastumisen päivä", easter(34)).between(1973, 1991),
    public("Ascension Day", "Helatorstai", easter(39)).since(1992),
    public("Whit Sunday", "Helluntaipäivä", easter(49)),
    bank("Midsummer Eve", "Juhannusaatto", fixed(6, 23)).until(1954),
    bank("Midsummer Eve", "Juhannusaatto", weekday_from(Weekday::Fri, 6, 19)).since(1955),
    public("Midsummer Day", "Juhannuspäivä", fixed(6, 24)).until(1954),
    public("Midsummer Day", "Juhannuspäivä", weekday_from(Weekday::Sat, 6, 20)).since(1955),
    public("All Saints' Day", "Pyhäinpäivä", fixed(11, 1)).until(1954),
    public("All Saints' Day", "Pyhäinpäivä", weekday_from(Weekday::Sat, 10, 31)).since(1955),
    public("Independence Day", "Itsenäisyyspäivä", fixed(12, 6)).since(1917),
    bank("Christmas Eve", "Jouluaatto", fixed(12, 24)),
    public("Christmas Day", "Joulupäivä", fixed(12, 25)),
    public("Boxing Day", "Tapaninpäivä", fixed(12, 26)),
];

fn rules(j: Jurisdiction) -> &'static [Rule] {
    match j {
        Jurisdiction::DK => DK_RULES,
        Jurisdiction::NO => NO_RULES,
        Jurisdiction::SE => SE_RULES,
        Jurisdiction::FI => FI_RULES,
    }
}

/// Easter Sunday (Gregorian) by the anonymous algorithm as given by Meeus; `None` outside
/// [`SUPPORTED_YEARS`].
pub fn easter_sunday(year: i32) -> Option<NaiveDate> {
    if !SUPPORTED_YEARS.contains(&year) {
        return None;
    }
    let a = year % 19;
    let b = year / 100;
    let c = year % 100;
    let d = b / 4;
    let e = b % 4;
    let f = (b + 8) / 25;
    let g = (b - f + 1) / 3;
    let h = (19 * a + b - d - g + 15) % 30;
    let i = c / 4;
    let k = c % 4;
    let l = (32 + 2 * e + 2 * i - h - k) % 7;
    let m = (a + 11 * h + 22 * l) / 451;
    let month = (h + l - 7 * m + 114) / 31;
    let day = (h + l - 7 * m + 114) % 31 + 1;
    NaiveDate::from_ymd_opt(year, u32::try_from(month).ok()?, u32::try_from(day).ok()?)
}

fn holidays_unsorted(j: Jurisdiction, year: i32) -> impl Iterator<Item = Holiday> {
    // `easter_sunday` is None exactly outside the supported years, which empties the table.
    let easter = easter_sunday(year);
    rules(j)
        .iter()
        .filter(move |rule| (rule.from..=rule.to).contains(&year))
        .filter_map(move |rule| {
            Some(Holiday {
                date: rule.date.resolve(year, easter?)?,
                name: rule.name,
                local_name: rule.local_name,
                kind: rule.kind,
            })
        })
}

/// Public holidays and bank closing days of `j` in `year`, sorted by date. Two rules may share a
/// date (Whit Monday on 5 June in Denmark); both are listed. Empty outside [`SUPPORTED_YEARS`].
pub fn holidays(j: Jurisdiction, year: i32) -> Vec<Holiday> {
    let mut all: Vec<Holiday> = holidays_unsorted(j, year).collect();
    all.sort_by_key(|h| h.date);
    all
}

/// The holiday or bank closing day on `date`, if any (the first in table order if two coincide).
pub fn holiday_on(j: Jurisdiction, date: NaiveDate) -> Option<Holiday> {
    holidays_unsorted(j, date.year()).find(|h| h.date == date)
}

fn is_weekend(date: NaiveDate) -> bool {
    matches!(date.weekday(), Weekday::Sat | Weekday::Sun)
}

/// Monday to Friday and neither a public holiday nor a bank closing day in `j`.
pub fn is_banking_day(j: Jurisdiction, date: NaiveDate) -> bool {
    !is_weekend(date) && holiday_on(j, date).is_none()
}

/// The first banking day strictly after `date`. Saturates at chrono's last representable date,
/// which is some 260,000 years away and only reachable by feeding it in.
pub fn next_banking_day(j: Jurisdiction, date: NaiveDate) -> NaiveDate {
    let mut day = date;
    while let Some(next) = day.succ_opt() {
        day = next;
        if is_banking_day(j, day) {
            return day;
        }
    }
    day
}

/// The last banking day strictly before `date`; saturates at chrono's first representable date.
pub fn previous_banking_day(j: Jurisdiction, date: NaiveDate) -> NaiveDate {
    let mut day = date;
    while let Some(previous) = day.pred_opt() {
        day = previous;
        if is_banking_day(j, day) {
            return day;
        }
    }
    day
}

/// `date` itself if it is a banking day, else the next one: a due date that falls on a
/// non-banking day moves forward, as the Nordic payment rules require.
pub fn roll_forward(j: Jurisdiction, date: NaiveDate) -> NaiveDate {
    if is_banking_day(j, date) {
        date
    } else {
        next_banking_day(j, date)
    }
}

/// `n` banking days after `date` (before it if `n` is negative), counting from `date` whether or
/// not it is a banking day itself, so a Saturday plus one banking day is the next banking day.
/// `n == 0` rolls forward. For a banking day `d`, `add_banking_days(add_banking_days(d, n), -n)`
/// is `d` again.
pub fn add_banking_days(j: Jurisdiction, date: NaiveDate, n: i32) -> NaiveDate {
    let step: fn(Jurisdiction, NaiveDate) -> NaiveDate = match n.signum() {
        0 => return roll_forward(j, date),
        1 => next_banking_day,
        _ => previous_banking_day,
    };
    let mut day = date;
    for _ in 0..n.unsigned_abs() {
        let moved = step(j, day);
        // Only at chrono's date limits does a step stand still; looping on would change nothing.
        if moved == day {
            break;
        }
        day = moved;
    }
    day
}

/// Every banking day from `from` to `to`, both inclusive; empty if `from > to`.
pub fn banking_days(j: Jurisdiction, from: NaiveDate, to: NaiveDate) -> Vec<NaiveDate> {
    if from > to {
        return Vec::new();
    }
    from.iter_days()
        .take_while(|d| *d <= to)
        .filter(|d| is_banking_day(j, *d))
        .collect()
}

/// When a debtor may be contacted, on their own wall clock. Each window is half-open
/// `[start, end)`; a window with `start >= end` allows nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ContactHours {
    /// Monday to Friday.
    pub weekdays: Option<(NaiveTime, NaiveTime)>,
    pub saturday: Option<(NaiveTime, NaiveTime)>,
    pub sunday: Option<(NaiveTime, NaiveTime)>,
    /// Whether contact is allowed on the days in the jurisdiction's holiday table. `false` also
    /// excludes bank closing days: they are Christmas Eve, New Year's Eve, Midsummer Eve and the
    /// like, days most debtors have off, and waiting a day costs less than a call on Christmas Eve.
    pub on_holidays: bool,
}

const fn hm(hour: u32, minute: u32) -> NaiveTime {
    // Evaluated at compile time, so an invalid constant fails the build rather than a request.
    match NaiveTime::from_hms_opt(hour, minute, 0) {
        Some(time) => time,
        None => panic!("invalid constant time of day"),
    }
}

const NORDIC_DEFAULT_HOURS: ContactHours = ContactHours {
    weekdays: Some((hm(8, 0), hm(21, 0))),
    saturday: Some((hm(9, 0), hm(15, 0))),
    sunday: None,
    on_holidays: false,
};

impl ContactHours {
    /// Weekdays 08:00–21:00, Saturdays 09:00–15:00, never on Sundays or holidays. One arm per
    /// country so that a national rule can diverge without touching the others.
    pub fn default_for(j: Jurisdiction) -> Self {
        match j {
            Jurisdiction::DK => NORDIC_DEFAULT_HOURS,
            Jurisdiction::NO => NORDIC_DEFAULT_HOURS,
            Jurisdiction::SE => NORDIC_DEFAULT_HOURS,
            Jurisdiction::FI => NORDIC_DEFAULT_HOURS,
        }
    }

    fn window_for(&self, weekday: Weekday) -> Option<(NaiveTime, NaiveTime)> {
        let window = match weekday {
            Weekday::Sat => self.saturday,
            Weekday::Sun => self.sunday,
            _ => self.weekdays,
        };
        window.filter(|(start, end)| start < end)
    }

    fn allows_anything(&self) -> bool {
        [Weekday::Mon, Weekday::Sat, Weekday::Sun]
            .into_iter()
            .any(|w| self.window_for(w).is_some())
    }
}

/// The contact window on a local date, if the date allows contact at all.
fn window_on(hours: &ContactHours, j: Jurisdiction, date: NaiveDate) -> Option<(NaiveTime, NaiveTime)> {
    if !hours.on_holidays && holiday_on(j, date).is_some() {
        return None;
    }
    hours.window_for(date.weekday())
}

/// Whether `at` falls inside an allowed window on the debtor's wall clock in `j`.
pub fn may_contact(hours: &ContactHours, j: Jurisdiction, at: DateTime<Utc>) -> bool {
    let local = at.with_timezone(&j.time_zone()).naive_local();
    window_on(hours, j, local.date()).is_some_and(|(start, end)| start <= local.time() && local.time() < end)
}

/// How far ahead `next_contact_moment` looks: over a year, so any yearly pattern is covered.
const CONTACT_SEARCH_DAYS: usize = 400;

/// `at` itself if contact is allowed then, else the start of the next allowed window, or `None`
/// if the hours allow nothing within about 400 days.
pub fn next_contact_moment(hours: &ContactHours, j: Jurisdiction, at: DateTime<Utc>) -> Option<DateTime<Utc>> {
    if may_contact(hours, j, at) {
        return Some(at);
    }
    if !hours.allows_anything() {
        return None;
    }
    let tz = j.time_zone();
    let today = at.with_timezone(&tz).date_naive();
    // A day early in case a transition at midnight puts the wall clock back over a date line.
    let first = today.pred_opt().unwrap_or(today);
    for day in first.iter_days().take(CONTACT_SEARCH_DAYS + 1) {
        let Some((start, _)) = window_on(hours, j, day) else {
            continue;
        };
        let found = window_starts(tz, day.and_time(start))
            .into_iter()
            .flatten()
            .find(|candidate| *candidate > at && may_contact(hours, j, *candidate));
        if found.is_some() {
            return found;
        }
    }
    None
}

/// The instants at which a window starting at wall-clock `local` opens: one normally, both
/// occurrences when the clock is put back over it (the second matters if `at` lies between
/// them), and the end of the gap when the clock skips over it.
fn window_starts(tz: Tz, local: NaiveDateTime) -> [Option<DateTime<Utc>>; 2] {
    let resolved = tz.from_local_datetime(&local);
    match (resolved.earliest(), resolved.latest()) {
        (Some(first), Some(last)) => [Some(first.with_timezone(&Utc)), Some(last.with_timezone(&Utc))],
        _ => [end_of_gap(tz, local), None],
    }
}

/// Longest wall-clock gap to look across; real ones in these zones are an hour or less.
const MAX_GAP_MINUTES: i64 = 24 * 60;

/// The first instant whose wall-clock time is at or after `local`, which lies in a gap.
fn end_of_gap(tz: Tz, local: NaiveDateTime) -> Option<DateTime<Utc>> {
    let exists = |wall: NaiveDateTime| tz.from_local_datetime(&wall).earliest();
    // Gaps end on whole minutes today, but Helsinki's 1921 switch from mean time (+1:39:49) did
    // not, so find the first minute past the gap and then the exact second before it.
    let floor = local.with_second(0)?.with_nanosecond(0)?;
    let past_gap = (1..=MAX_GAP_MINUTES)
        .map(|m| floor + TimeDelta::minutes(m))
        .find(|wall| exists(*wall).is_some())?;
    (0..60)
        .rev()
        .map(|s| past_gap - TimeDelta::seconds(s))
        .filter(|wall| *wall >= local)
        .find_map(exists)
        .map(|instant| instant.with_timezone(&Utc))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn d(y: i32, m: u32, day: u32) -> NaiveDate {
        NaiveDate::from_ymd_opt(y, m, day).unwrap()
    }

    fn utc(y: i32, m: u32, day: u32, h: u32, min: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(y, m, day, h, min, 0).unwrap()
    }

    fn named(j: Jurisdiction, year: i32, name: &str) -> Vec<NaiveDate> {
        holidays(j, year)
            .into_iter()
            .filter(|h| h.name == name)
            .map(|h| h.date)
            .collect()
    }

    /// Weekdays on which the banks are closed: what a bank's published list amounts to.
    fn closed_weekdays(j: Jurisdiction, year: i32) -> Vec<NaiveDate> {
        d(year, 1, 1)
            .iter_days()
            .take_while(|day| day.year() == year)
            .filter(|day| !is_weekend(*day) && !is_banking_day(j, *day))
            .collect()
    }

    #[test]
    fn easter_sunday_matches_published_dates() {
        // Published Easter tables; 1943 and 2038 fall on the latest possible date, 25 April.
        assert_eq!(easter_sunday(2024), Some(d(2024, 3, 31)));
        assert_eq!(easter_sunday(2025), Some(d(2025, 4, 20)));
        assert_eq!(easter_sunday(2026), Some(d(2026, 4, 5)));
        assert_eq!(easter_sunday(2027), Some(d(2027, 3, 28)));
        assert_eq!(easter_sunday(2000), Some(d(2000, 4, 23)));
        assert_eq!(easter_sunday(1900), Some(d(1900, 4, 15)));
        assert_eq!(easter_sunday(1943), Some(d(1943, 4, 25)));
        assert_eq!(easter_sunday(2008), Some(d(2008, 3, 23)));
        assert_eq!(easter_sunday(2038), Some(d(2038, 4, 25)));
        assert_eq!(easter_sunday(1899), None);
        assert_eq!(easter_sunday(2200), None);
    }

    #[test]
    fn easter_is_always_a_sunday_between_22_march_and_25_april() {
        for year in SUPPORTED_YEARS {
            let easter = easter_sunday(year).unwrap();
            assert_eq!(easter.weekday(), Weekday::Sun, "{year}");
            assert!(easter >= d(year, 3, 22) && easter <= d(year, 4, 25), "{year}");
        }
    }

    #[test]
    fn every_year_has_a_sorted_table_within_that_year() {
        for j in Jurisdiction::ALL {
            for year in SUPPORTED_YEARS {
                let table = holidays(j, year);
                assert!(table.len() >= 10, "{j} {year}");
                assert!(table.windows(2).all(|w| w[0].date <= w[1].date), "{j} {year}");
                assert!(table.iter().all(|h| h.date.year() == year), "{j} {year}");
            }
            assert!(holidays(j, 1899).is_empty());
            assert!(holidays(j, 2200).is_empty());
        }
    }

    #[test]
    fn denmark_matches_nationalbanken_bank_closing_days() {
        // Danmarks Nationalbank, "Banklukkedage", 2026 and 2027, weekday entries only
        // (the 2026 list also names 26 December, a Saturday).
        assert_eq!(
            closed_weekdays(Jurisdiction::DK, 2026),
            vec![
                d(2026, 1, 1),
                d(2026, 4, 2),
                d(2026, 4, 3),
                d(2026, 4, 6),
                d(2026, 5, 14),
                d(2026, 5, 15),
                d(2026, 5, 25),
                d(2026, 6, 5),
                d(2026, 12, 24),
                d(2026, 12, 25),
                d(2026, 12, 31),
            ]
        );
        assert_eq!(
            closed_weekdays(Jurisdiction::DK, 2027),
            vec![
                d(2027, 1, 1),
                d(2027, 3, 25),
                d(2027, 3, 26),
                d(2027, 3, 29),
                d(2027, 5, 6),
                d(2027, 5, 7),
                d(2027, 5, 17),
                d(2027, 12, 24),
                d(2027, 12, 31),
            ]
        );
    }

    #[test]
    fn denmark_great_prayer_day_ends_with_2023() {
        // Last Store bededag was Friday 5 May 2023; abolished from 2024.
        assert_eq!(named(Jurisdiction::DK, 2023, "Great Prayer Day"), vec![d(2023, 5, 5)]);
        assert!(named(Jurisdiction::DK, 2024, "Great Prayer Day").is_empty());
        assert!(is_banking_day(Jurisdiction::DK, d(2024, 4, 26)));
        assert!(!is_banking_day(Jurisdiction::DK, d(2023, 5, 5)));
        let constitution = holiday_on(Jurisdiction::DK, d(2025, 6, 5)).unwrap();
        assert_eq!(
            (constitution.local_name, constitution.kind),
            ("Grundlovsdag", DayKind::BankClosing)
        );
        // 1 May is a working day for Danish banks.
        assert!(is_banking_day(Jurisdiction::DK, d(2025, 5, 1)));
    }

    #[test]
    fn norway_matches_norges_bank_settlement_days() {
        // Norges Bank, "Oppgjørsdager 2017": NBO closed on these weekdays (1 Jan and 24 Dec were Sundays).
        assert_eq!(
            closed_weekdays(Jurisdiction::NO, 2017),
            vec![
                d(2017, 4, 13),
                d(2017, 4, 14),
                d(2017, 4, 17),
                d(2017, 5, 1),
                d(2017, 5, 17),
                d(2017, 5, 25),
                d(2017, 6, 5),
                d(2017, 12, 25),
                d(2017, 12, 26),
            ]
        );
        // Norges Bank, "Settlement days" (English page, 2019 dates).
        for day in [
            d(2019, 4, 18),
            d(2019, 4, 19),
            d(2019, 4, 22),
            d(2019, 5, 30),
            d(2019, 6, 10),
        ] {
            assert!(!is_banking_day(Jurisdiction::NO, day), "{day}");
        }
        let may_17 = holiday_on(Jurisdiction::NO, d(2024, 5, 17)).unwrap();
        assert_eq!((may_17.name, may_17.kind), ("Constitution Day", DayKind::PublicHoliday));
        assert!(!is_banking_day(Jurisdiction::NO, d(2024, 5, 17)));
        // Not on Norges Bank's list.
        assert!(is_banking_day(Jurisdiction::NO, d(2024, 12, 31)));
    }

    #[test]
    fn sweden_2025_follows_the_holidays_act_and_bank_free_days() {
        // Lag (1989:253) plus midsommarafton, julafton, nyårsafton; 2025 (Easter 20 April).
        assert_eq!(named(Jurisdiction::SE, 2025, "Midsummer Eve"), vec![d(2025, 6, 20)]);
        assert_eq!(named(Jurisdiction::SE, 2025, "Midsummer Day"), vec![d(2025, 6, 21)]);
        assert_eq!(named(Jurisdiction::SE, 2025, "All Saints' Day"), vec![d(2025, 11, 1)]);
        assert_eq!(
            closed_weekdays(Jurisdiction::SE, 2025),
            vec![
                d(2025, 1, 1),
                d(2025, 1, 6),
                d(2025, 4, 18),
                d(2025, 4, 21),
                d(2025, 5, 1),
                d(2025, 5, 29),
                d(2025, 6, 6),
                d(2025, 6, 20),
                d(2025, 12, 24),
                d(2025, 12, 25),
                d(2025, 12, 26),
                d(2025, 12, 31),
            ]
        );
        let eve = holiday_on(Jurisdiction::SE, d(2025, 6, 20)).unwrap();
        assert_eq!((eve.local_name, eve.kind), ("Midsommarafton", DayKind::BankClosing));
        // Lag (2004:1320): Whit Monday until 2004, National Day from 2005.
        assert!(!is_banking_day(Jurisdiction::SE, d(2004, 5, 31)));
        assert!(is_banking_day(Jurisdiction::SE, d(2005, 5, 16)));
        assert!(!is_banking_day(Jurisdiction::SE, d(2005, 6, 6)));
        // Maundy Thursday is a banking day in Sweden.
        assert!(is_banking_day(Jurisdiction::SE, d(2025, 4, 17)));
    }

    #[test]
    fn finland_2024_matches_the_banks_service_calendar() {
        // OP Financial Group, customer service exceptions 2024: closed on these weekdays;
        // Maundy Thursday and New Year's Eve open until 13:00.
        assert_eq!(
            closed_weekdays(Jurisdiction::FI, 2024),
            vec![
                d(2024, 1, 1),
                d(2024, 3, 29),
                d(2024, 4, 1),
                d(2024, 5, 1),
                d(2024, 5, 9),
                d(2024, 6, 21),
                d(2024, 12, 6),
                d(2024, 12, 24),
                d(2024, 12, 25),
                d(2024, 12, 26),
            ]
        );
        assert!(is_banking_day(Jurisdiction::FI, d(2024, 12, 31)));
        // Midsummer Eve 2026 is Friday 19 June, Midsummer Day and All Saints' Day are Saturdays.
        assert_eq!(named(Jurisdiction::FI, 2026, "Midsummer Eve"), vec![d(2026, 6, 19)]);
        assert_eq!(named(Jurisdiction::FI, 2026, "Midsummer Day"), vec![d(2026, 6, 20)]);
        assert_eq!(named(Jurisdiction::FI, 2026, "All Saints' Day"), vec![d(2026, 10, 31)]);
        // 2027: 18 June is a Friday, but Midsummer Day is Saturday 26 June.
        assert_eq!(named(Jurisdiction::FI, 2027, "Midsummer Eve"), vec![d(2027, 6, 25)]);
        let independence = holiday_on(Jurisdiction::FI, d(2024, 12, 6)).unwrap();
        assert_eq!(independence.local_name, "Itsenäisyyspäivä");
    }

    #[test]
    fn next_banking_day_skips_easter_and_christmas() {
        // Easter 2025: Maundy Thursday 17 April to Easter Monday 21 April.
        assert_eq!(next_banking_day(Jurisdiction::DK, d(2025, 4, 16)), d(2025, 4, 22));
        assert_eq!(next_banking_day(Jurisdiction::NO, d(2025, 4, 16)), d(2025, 4, 22));
        assert_eq!(next_banking_day(Jurisdiction::SE, d(2025, 4, 16)), d(2025, 4, 17));
        assert_eq!(next_banking_day(Jurisdiction::FI, d(2025, 4, 17)), d(2025, 4, 22));
        assert_eq!(previous_banking_day(Jurisdiction::DK, d(2025, 4, 22)), d(2025, 4, 16));
        // Christmas 2025: Wednesday 24 to Friday 26 December, then the weekend.
        for j in Jurisdiction::ALL {
            assert_eq!(next_banking_day(j, d(2025, 12, 23)), d(2025, 12, 29), "{j}");
        }
        // New Year's Eve closes Danish and Swedish banks, not Norwegian or Finnish ones.
        assert_eq!(next_banking_day(Jurisdiction::DK, d(2025, 12, 30)), d(2026, 1, 2));
        assert_eq!(next_banking_day(Jurisdiction::SE, d(2025, 12, 30)), d(2026, 1, 2));
        assert_eq!(next_banking_day(Jurisdiction::NO, d(2025, 12, 30)), d(2025, 12, 31));
        assert_eq!(next_banking_day(Jurisdiction::FI, d(2025, 12, 30)), d(2025, 12, 31));
        assert_eq!(previous_banking_day(Jurisdiction::FI, d(2024, 12, 27)), d(2024, 12, 23));
    }

    #[test]
    fn a_due_date_on_a_non_banking_day_rolls_forward() {
        assert_eq!(roll_forward(Jurisdiction::SE, d(2025, 3, 15)), d(2025, 3, 17));
        assert_eq!(roll_forward(Jurisdiction::DK, d(2025, 4, 19)), d(2025, 4, 22));
        assert_eq!(roll_forward(Jurisdiction::DK, d(2025, 4, 16)), d(2025, 4, 16));
        assert_eq!(add_banking_days(Jurisdiction::SE, d(2025, 3, 15), 0), d(2025, 3, 17));
    }

    #[test]
    fn adding_banking_days_counts_only_banking_days() {
        assert_eq!(add_banking_days(Jurisdiction::DK, d(2025, 12, 22), 2), d(2025, 12, 29));
        assert_eq!(add_banking_days(Jurisdiction::DK, d(2026, 1, 2), -1), d(2025, 12, 30));
        assert_eq!(add_banking_days(Jurisdiction::SE, d(2025, 3, 15), 1), d(2025, 3, 17));
        assert_eq!(
            banking_days(Jurisdiction::DK, d(2025, 12, 22), d(2026, 1, 2)),
            vec![
                d(2025, 12, 22),
                d(2025, 12, 23),
                d(2025, 12, 29),
                d(2025, 12, 30),
                d(2026, 1, 2)
            ]
        );
        assert!(banking_days(Jurisdiction::DK, d(2026, 1, 2), d(2025, 12, 22)).is_empty());
    }

    #[test]
    fn contact_windows_are_half_open_on_the_local_clock() {
        let hours = ContactHours::default_for(Jurisdiction::DK);
        // Tuesday 2025-01-14, CET: 20:59 local is allowed, 21:00 is not.
        assert!(may_contact(&hours, Jurisdiction::DK, utc(2025, 1, 14, 19, 59)));
        assert!(!may_contact(&hours, Jurisdiction::DK, utc(2025, 1, 14, 20, 0)));
        assert!(may_contact(&hours, Jurisdiction::DK, utc(2025, 1, 14, 7, 0)));
        assert!(!may_contact(&hours, Jurisdiction::DK, utc(2025, 1, 14, 6, 59)));
        // The same instant is 09:00 in Helsinki, already allowed.
        assert!(may_contact(&hours, Jurisdiction::FI, utc(2025, 1, 14, 6, 59)));
        let at = utc(2025, 1, 14, 12, 0);
        assert_eq!(next_contact_moment(&hours, Jurisdiction::DK, at), Some(at));
    }

    #[test]
    fn next_contact_moment_crosses_the_spring_dst_change() {
        let hours = ContactHours::default_for(Jurisdiction::SE);
        // Saturday 29 March 2025, 15:30 CET: the Saturday window has closed, Sunday is off, and the
        // clocks go forward on Sunday 30 March, so Monday 08:00 is CEST (06:00 UTC).
        let at = utc(2025, 3, 29, 14, 30);
        assert_eq!(
            next_contact_moment(&hours, Jurisdiction::SE, at),
            Some(utc(2025, 3, 31, 6, 0))
        );
        // Helsinki is an hour ahead: Monday 08:00 EEST is 05:00 UTC.
        let hours = ContactHours::default_for(Jurisdiction::FI);
        assert_eq!(
            next_contact_moment(&hours, Jurisdiction::FI, at),
            Some(utc(2025, 3, 31, 5, 0))
        );
    }

    #[test]
    fn next_contact_moment_crosses_the_autumn_dst_change() {
        let hours = ContactHours::default_for(Jurisdiction::NO);
        // Saturday 25 October 2025, 16:00 CEST; clocks go back on Sunday 26 October, so Monday
        // 08:00 is CET (07:00 UTC).
        let at = utc(2025, 10, 25, 14, 0);
        assert_eq!(
            next_contact_moment(&hours, Jurisdiction::NO, at),
            Some(utc(2025, 10, 27, 7, 0))
        );
        // Before the Saturday window opens: 09:00 CEST is 07:00 UTC.
        let early = utc(2025, 10, 25, 5, 0);
        assert_eq!(
            next_contact_moment(&hours, Jurisdiction::NO, early),
            Some(utc(2025, 10, 25, 7, 0))
        );
    }

    #[test]
    fn next_contact_moment_skips_holidays() {
        let hours = ContactHours::default_for(Jurisdiction::DK);
        // Tuesday 23 December 2025, 21:30 CET: Christmas Eve (bank closing day), Christmas Day and
        // Boxing Day are off; Saturday 27 December 09:00 CET is 08:00 UTC.
        let at = utc(2025, 12, 23, 20, 30);
        assert_eq!(
            next_contact_moment(&hours, Jurisdiction::DK, at),
            Some(utc(2025, 12, 27, 8, 0))
        );
        // Finland's Independence Day, Friday 6 December 2024: next is Saturday 09:00 EET.
        let hours = ContactHours::default_for(Jurisdiction::FI);
        let at = utc(2024, 12, 6, 8, 0);
        assert!(!may_contact(&hours, Jurisdiction::FI, at));
        assert_eq!(
            next_contact_moment(&hours, Jurisdiction::FI, at),
            Some(utc(2024, 12, 7, 7, 0))
        );
        let anytime = ContactHours {
            on_holidays: true,
            ..hours
        };
        assert!(may_contact(&anytime, Jurisdiction::FI, at));
    }

    #[test]
    fn a_window_starting_in_the_spring_gap_opens_when_the_clock_resumes() {
        let hours = ContactHours {
            weekdays: None,
            saturday: None,
            sunday: Some((hm(2, 30), hm(4, 0))),
            on_holidays: false,
        };
        // Sunday 30 March 2025 in Stockholm: 02:00–03:00 does not exist; 03:00 CEST is 01:00 UTC.
        let at = utc(2025, 3, 30, 0, 0);
        assert_eq!(
            next_contact_moment(&hours, Jurisdiction::SE, at),
            Some(utc(2025, 3, 30, 1, 0))
        );
    }

    #[test]
    fn a_window_starting_in_the_autumn_overlap_opens_at_each_occurrence() {
        let hours = ContactHours {
            weekdays: None,
            saturday: None,
            sunday: Some((hm(2, 30), hm(4, 0))),
            on_holidays: false,
        };
        // Sunday 26 October 2025 in Stockholm: 02:30 happens at 00:30 UTC (CEST) and 01:30 UTC (CET).
        let before = utc(2025, 10, 26, 0, 0);
        assert_eq!(
            next_contact_moment(&hours, Jurisdiction::SE, before),
            Some(utc(2025, 10, 26, 0, 30))
        );
        // 01:05 UTC is 02:05 CET, back before the window's start on the wall clock.
        let between = utc(2025, 10, 26, 1, 5);
        assert!(!may_contact(&hours, Jurisdiction::SE, between));
        assert_eq!(
            next_contact_moment(&hours, Jurisdiction::SE, between),
            Some(utc(2025, 10, 26, 1, 30))
        );
    }

    #[test]
    fn hours_that_allow_nothing_give_no_moment() {
        let never = ContactHours {
            weekdays: None,
            saturday: None,
            sunday: None,
            on_holidays: true,
        };
        assert_eq!(
            next_contact_moment(&never, Jurisdiction::DK, utc(2025, 1, 14, 12, 0)),
            None
        );
        let empty = ContactHours {
            weekdays: Some((hm(9, 0), hm(9, 0))),
            ..never
        };
        assert_eq!(
            next_contact_moment(&empty, Jurisdiction::DK, utc(2025, 1, 14, 12, 0)),
            None
        );
    }

    #[test]
    fn end_of_gap_finds_helsinkis_1921_switch_to_the_second() {
        // 1 May 1921: Helsinki went from mean time (+1:39:49) to EET (+2:00) at midnight, skipping
        // 00:00:00–00:20:11 on the wall clock.
        let tz = Jurisdiction::FI.time_zone();
        let local = d(1921, 5, 1).and_hms_opt(0, 5, 0).unwrap();
        assert!(tz.from_local_datetime(&local).earliest().is_none());
        let end = end_of_gap(tz, local).unwrap();
        assert_eq!(
            end.with_timezone(&tz).naive_local(),
            d(1921, 5, 1).and_hms_opt(0, 20, 11).unwrap()
        );
    }

    fn jurisdiction() -> impl Strategy<Value = Jurisdiction> {
        prop::sample::select(Jurisdiction::ALL.to_vec())
    }

    fn date() -> impl Strategy<Value = NaiveDate> {
        let first = d(FIRST_YEAR, 1, 1);
        let span = (d(LAST_YEAR, 12, 31) - first).num_days();
        (0..=span).prop_map(move |days| first + TimeDelta::days(days))
    }

    fn instant() -> impl Strategy<Value = DateTime<Utc>> {
        // 1906 to 2096: DST rules old and new, and both centuries' holiday tables.
        (-2_000_000_000i64..4_000_000_000).prop_map(|secs| DateTime::from_timestamp(secs, 0).unwrap())
    }

    proptest! {
        #[test]
        fn next_banking_day_is_a_later_banking_day(j in jurisdiction(), day in date()) {
            let next = next_banking_day(j, day);
            prop_assert!(next > day);
            prop_assert!(is_banking_day(j, next));
            prop_assert!(day.iter_days().skip(1).take_while(|x| *x < next).all(|x| !is_banking_day(j, x)));
        }

        #[test]
        fn previous_banking_day_is_an_earlier_banking_day(j in jurisdiction(), day in date()) {
            let previous = previous_banking_day(j, day);
            prop_assert!(previous < day);
            prop_assert!(is_banking_day(j, previous));
        }

        #[test]
        fn roll_forward_never_goes_back(j in jurisdiction(), day in date()) {
            let rolled = roll_forward(j, day);
            prop_assert!(rolled >= day);
            prop_assert!(is_banking_day(j, rolled));
            prop_assert_eq!(rolled == day, is_banking_day(j, day));
        }

        #[test]
        fn adding_and_subtracting_banking_days_round_trips(j in jurisdiction(), day in date(), n in -300i32..300) {
            let start = roll_forward(j, day);
            let moved = add_banking_days(j, start, n);
            prop_assert!(is_banking_day(j, moved));
            prop_assert_eq!(add_banking_days(j, moved, -n), start);
        }

        #[test]
        fn next_contact_moment_is_allowed_and_not_earlier(j in jurisdiction(), at in instant()) {
            let hours = ContactHours::default_for(j);
            let next = next_contact_moment(&hours, j, at);
            prop_assert!(next.is_some());
            let next = next.unwrap();
            prop_assert!(next >= at);
            prop_assert!(may_contact(&hours, j, next));
            // A moment later than `at` must open a window: the second before it is not allowed.
            if next > at {
                prop_assert!(!may_contact(&hours, j, next - TimeDelta::seconds(1)));
            }
        }
    }
}
