//! The results: one row per figure, printed as a table with ratios and written as JSON.

use serde_json::{Value, json};

/// The performance issue's target for a figure (reported, never asserted).
#[derive(Debug, Clone, Copy)]
pub enum Goal {
    None,
    /// hostnet ≥ `direct` × the direct figure and ≥ `socat` × the socat figure; hostnet with
    /// the buffer gear alone ≥ `buffer` × the direct figure.
    Ratios {
        direct: f64,
        socat: f64,
        buffer: f64,
    },
    /// hostnet ≥ this × the direct figure (for the real VM: the raw vsock link).
    VsDirect(f64),
    /// hostnet ≤ this × the direct figure (a cost).
    AtMostVsDirect(f64),
    /// hostnet ≤ the socat chain's figure.
    AtMostSocat,
    /// hostnet ≤ this.
    AtMost(f64),
}

impl Goal {
    fn text(self, unit: &str) -> String {
        match self {
            Goal::None => String::new(),
            Goal::Ratios { direct, socat, buffer } => {
                format!("≥ {direct}× direct (buffer gear ≥ {buffer}×), ≥ {socat}× socat")
            }
            Goal::VsDirect(r) => format!("≥ {r}× direct"),
            Goal::AtMostVsDirect(r) => format!("≤ {r}× direct"),
            Goal::AtMostSocat => "≤ socat".to_owned(),
            Goal::AtMost(v) => format!("≤ {} {unit}", plain(v)),
        }
    }
}

/// One measured figure over the paths it applies to.
#[derive(Debug, Clone)]
pub struct Row {
    pub workload: String,
    pub unit: &'static str,
    pub direct: Option<f64>,
    pub hostnet: Option<f64>,
    /// hostnet with the splice gear off (`demo --no-splice`): the buffer gear alone, as over
    /// vsock and on macOS and Windows.
    pub buffer: Option<f64>,
    pub socat: Option<f64>,
    /// The bare relay chain (`bare.rs`): what the topology costs with nothing in the relays.
    pub bare: Option<f64>,
    pub goal: Goal,
    /// How the figure was taken when that matters for reading it (sizes, quick-mode cuts).
    pub note: String,
}

/// One measurement per path, for rows that show one of its figures in each column.
#[derive(Debug)]
pub struct Paths<T> {
    pub direct: T,
    pub hostnet: T,
    /// hostnet with the splice gear off, where that demo ran.
    pub buffer: Option<T>,
    /// Where socat ran.
    pub socat: Option<T>,
    pub bare: T,
}

impl<T> Paths<T> {
    /// `row` with `f` of each path in its column.
    pub fn row(&self, row: Row, f: impl Fn(&T) -> f64) -> Row {
        let direct = f(&self.direct);
        self.relays(row, f).direct(direct)
    }

    /// [`Paths::row`] without the direct column: a relay's own figure, which direct has none of.
    pub fn relays(&self, row: Row, f: impl Fn(&T) -> f64) -> Row {
        row.hostnet(f(&self.hostnet))
            .buffer(self.buffer.as_ref().map(&f))
            .socat(self.socat.as_ref().map(&f))
            .bare(f(&self.bare))
    }
}

impl Row {
    pub fn new(workload: impl Into<String>, unit: &'static str) -> Row {
        Row {
            workload: workload.into(),
            unit,
            direct: None,
            hostnet: None,
            buffer: None,
            socat: None,
            bare: None,
            goal: Goal::None,
            note: String::new(),
        }
    }

    pub fn direct(mut self, v: f64) -> Row {
        self.direct = Some(v);
        self
    }

    pub fn hostnet(mut self, v: f64) -> Row {
        self.hostnet = Some(v);
        self
    }

    pub fn buffer(mut self, v: Option<f64>) -> Row {
        self.buffer = v;
        self
    }

    pub fn socat(mut self, v: Option<f64>) -> Row {
        self.socat = v;
        self
    }

    pub fn bare(mut self, v: f64) -> Row {
        self.bare = Some(v);
        self
    }

    pub fn goal(mut self, g: Goal) -> Row {
        self.goal = g;
        self
    }

    pub fn note(mut self, n: impl Into<String>) -> Row {
        self.note = n.into();
        self
    }

    pub fn vs_direct(&self) -> Option<f64> {
        ratio(self.hostnet?, self.direct?)
    }

    /// The buffer gear's figure over direct's.
    pub fn buffer_vs_direct(&self) -> Option<f64> {
        ratio(self.buffer?, self.direct?)
    }

    pub fn vs_socat(&self) -> Option<f64> {
        ratio(self.hostnet?, self.socat?)
    }

    /// hostnet's figure over the bare relay's: how far hostnet is from what the topology costs.
    pub fn vs_bare(&self) -> Option<f64> {
        ratio(self.hostnet?, self.bare?)
    }

    /// Whether hostnet meets the goal in this run (`None`: no goal, or not measurable).
    pub fn met(&self) -> Option<bool> {
        let h = self.hostnet?;
        match self.goal {
            Goal::None => None,
            Goal::Ratios { direct, socat, buffer } => {
                let d = self.vs_direct().map(|r| r >= direct)?;
                let s = self.vs_socat().is_none_or(|r| r >= socat);
                let b = self.buffer_vs_direct().is_none_or(|r| r >= buffer);
                Some(d && s && b)
            }
            Goal::VsDirect(r) => Some(self.vs_direct()? >= r),
            Goal::AtMostVsDirect(r) => Some(self.vs_direct()? <= r),
            Goal::AtMostSocat => Some(h <= self.socat?),
            Goal::AtMost(v) => Some(h <= v),
        }
    }

    pub fn json(&self) -> Value {
        json!({
            "workload": self.workload,
            "unit": self.unit,
            "direct": self.direct,
            "hostnet": self.hostnet,
            "hostnet_buffer_gear": self.buffer,
            "socat": self.socat,
            "bare_relay": self.bare,
            "hostnet_vs_direct": self.vs_direct(),
            "buffer_gear_vs_direct": self.buffer_vs_direct(),
            "hostnet_vs_socat": self.vs_socat(),
            "hostnet_vs_bare_relay": self.vs_bare(),
            "target": self.goal.text(self.unit),
            "met": self.met(),
            "note": self.note,
        })
    }
}

fn ratio(a: f64, b: f64) -> Option<f64> {
    (b != 0.0 && a.is_finite() && b.is_finite()).then(|| a / b)
}

/// A figure with a precision that suits its size.
pub fn num(v: f64) -> String {
    let a = v.abs();
    if a >= 1000.0 {
        let s = format!("{v:.0}");
        // Thin groups of three digits: 150 000.
        let (sign, digits) = s.split_at(usize::from(s.starts_with('-')));
        let mut out = String::new();
        for (i, c) in digits.chars().enumerate() {
            if i > 0 && (digits.len() - i) % 3 == 0 {
                out.push(' ');
            }
            out.push(c);
        }
        format!("{sign}{out}")
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

/// A round figure as written in the targets: 2, 0.5, 100 000.
fn plain(v: f64) -> String {
    if v.fract() == 0.0 { num(v).split('.').next().unwrap_or_default().to_owned() } else { v.to_string() }
}

fn opt(v: Option<f64>) -> String {
    v.map_or_else(|| "–".to_owned(), num)
}

fn times(v: Option<f64>) -> String {
    v.map_or_else(|| "–".to_owned(), |r| format!("{r:.2}×"))
}

/// Prints the table: figures, ratios hostnet/direct, buffer gear/direct, hostnet/socat and
/// hostnet/bare relay, target and verdict.
pub fn print_table(rows: &[Row]) {
    println!(
        "\n{:<40} {:>11} {:>11} {:>11} {:>11} {:>11} {:>8} {:>8} {:>8} {:>8}  {:<14} {:<30} result",
        "workload",
        "direct",
        "hostnet",
        "h buffer",
        "socat",
        "bare",
        "h/direct",
        "b/direct",
        "h/socat",
        "h/bare",
        "unit",
        "target"
    );
    for r in rows {
        let verdict = match r.met() {
            Some(true) => "met",
            Some(false) => "NOT MET",
            None => "",
        };
        println!(
            "{:<40} {:>11} {:>11} {:>11} {:>11} {:>11} {:>8} {:>8} {:>8} {:>8}  {:<14} {:<30} {verdict}",
            r.workload,
            opt(r.direct),
            opt(r.hostnet),
            opt(r.buffer),
            opt(r.socat),
            opt(r.bare),
            times(r.vs_direct()),
            times(r.buffer_vs_direct()),
            times(r.vs_socat()),
            times(r.vs_bare()),
            r.unit,
            r.goal.text(r.unit),
        );
        if !r.note.is_empty() {
            println!("{:<40} ({})", "", r.note);
        }
    }
}
