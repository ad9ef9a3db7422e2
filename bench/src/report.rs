//! Process statistics from /proc and the summary a run prints.

use hdrhistogram::Histogram;
use serde_json::Value;

/// CPU seconds (user + system) of a process (`None`: this one), from /proc.
pub fn cpu_seconds(pid: Option<u32>) -> Option<f64> {
    let path = match pid {
        Some(pid) => format!("/proc/{pid}/stat"),
        None => "/proc/self/stat".to_string(),
    };
    let stat = std::fs::read_to_string(path).ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

/// Resident set size of a process, from /proc.
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Named figures, printed as a table or as one JSON object.
pub struct Report {
    fields: Vec<(String, Value)>,
}

impl Report {
    pub fn new() -> Self {
        Report { fields: Vec::new() }
    }

    pub fn add(&mut self, name: impl Into<String>, value: impl Into<Value>) {
        self.fields.push((name.into(), value.into()));
    }

    /// p50/p90/p99/max in milliseconds of a histogram in microseconds.
    pub fn latency(&mut self, prefix: &str, histogram: &Histogram<u64>) {
        if histogram.is_empty() {
            return;
        }
        let ms = |us: u64| us as f64 / 1000.0;
        self.add(
            format!("{prefix}_p50_ms"),
            ms(histogram.value_at_quantile(0.5)),
        );
        self.add(
            format!("{prefix}_p90_ms"),
            ms(histogram.value_at_quantile(0.9)),
        );
        self.add(
            format!("{prefix}_p99_ms"),
            ms(histogram.value_at_quantile(0.99)),
        );
        self.add(format!("{prefix}_max_ms"), ms(histogram.max()));
    }

    pub fn print(&self, json: bool) {
        if json {
            let object: serde_json::Map<String, Value> = self.fields.iter().cloned().collect();
            println!("{}", Value::Object(object));
            return;
        }
        let width = self.fields.iter().map(|(n, _)| n.len()).max().unwrap_or(0);
        for (name, value) in &self.fields {
            let shown = match value {
                Value::Number(n) if n.is_f64() => {
                    let f = n.as_f64().unwrap_or_default();
                    if f.abs() >= 1000.0 {
                        format!("{f:.0}")
                    } else {
                        format!("{f:.3}")
                    }
                }
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            println!("{name:<width$}  {shown}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        assert!(cpu_seconds(None).is_some());
        assert!(rss_bytes(std::process::id()).is_some_and(|rss| rss > 0));
    }
}
