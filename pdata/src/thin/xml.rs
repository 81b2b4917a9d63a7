//! The thin_dump / thin_restore XML format: an in-memory model, a parser and an emitter.
//!
//! The emitter prints byte-for-byte what `thin_dump` 0.9.0 prints:
//!
//! ```text
//! <superblock uuid="" time="T" transaction="N" flags="F" version="2" data_block_size="S" nr_data_blocks="D">
//!   <device dev_id="I" mapped_blocks="M" transaction="N" creation_time="C" snap_time="ST">
//!     <range_mapping origin_begin="V" data_begin="B" length="L" time="t"/>
//!     <single_mapping origin_block="V" data_block="B" time="t"/>
//!   </device>
//! </superblock>
//! ```
//!
//! Mappings are run-length encoded the way thin_dump does it: consecutive mappings (in
//! virtual-block order) whose virtual blocks *and* data blocks both increase by one and whose
//! times are equal form one run; a run of length 1 is a `single_mapping`, a longer one a
//! `range_mapping`. Runs span B-tree leaf boundaries. Devices appear in increasing `dev_id`
//! order, mappings in increasing virtual-block order, two-space indentation, `\n` line ends.
//!
//! The parser accepts what thin_restore accepts for these four elements (attributes in any
//! order, `<?xml ...?>` prolog, comments, both `<x/>` and `<x></x>`), validates every number
//! (range, 40-bit data blocks, 24-bit times, no overlapping mappings, no duplicate devices)
//! and returns an error with the line number for anything else. It never panics.
#![deny(clippy::unwrap_used, clippy::indexing_slicing)]

use std::cell::Cell;
use std::collections::BTreeMap;
use std::fmt;

/// Largest data block number a mapping value can hold (40 bits).
pub const MAX_DATA_BLOCK: u64 = (1 << 40) - 1;
/// Largest time a mapping value can hold (24 bits).
pub const MAX_MAPPING_TIME: u32 = (1 << 24) - 1;
/// No element of the schema has more than seven attributes; a bound keeps hostile input cheap.
const MAX_ATTRIBUTES: usize = 16;

/// One run of mappings: virtual blocks `origin_begin..origin_begin+length` map to data blocks
/// `data_begin..data_begin+length`, all written at `time`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MappingRun {
    /// First virtual (thin) block.
    pub origin_begin: u64,
    /// First data block.
    pub data_begin: u64,
    /// Number of blocks (≥ 1).
    pub length: u64,
    /// Pool time the mappings were written at (24 bits).
    pub time: u32,
}

impl MappingRun {
    /// One mapping.
    pub fn single(origin: u64, data: u64, time: u32) -> Self {
        MappingRun {
            origin_begin: origin,
            data_begin: data,
            length: 1,
            time,
        }
    }

    /// True when `next` continues this run (both block numbers consecutive, same time).
    fn continued_by(&self, next: &MappingRun) -> bool {
        self.time == next.time
            && self.origin_begin.checked_add(self.length) == Some(next.origin_begin)
            && self.data_begin.checked_add(self.length) == Some(next.data_begin)
    }

    /// The single mappings of this run: `(virtual block, data block, time)`.
    pub fn iter(&self) -> impl Iterator<Item = (u64, u64, u32)> + '_ {
        (0..self.length).map(move |i| (self.origin_begin + i, self.data_begin + i, self.time))
    }
}

/// One thin device: its details and its mappings (sorted by virtual block, non-overlapping).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DeviceXml {
    /// Thin device id.
    pub dev_id: u64,
    /// Number of mapped blocks as stored in the device details.
    pub mapped_blocks: u64,
    /// Pool transaction id when the device was created.
    pub transaction: u64,
    /// Pool time when the device was created.
    pub creation_time: u32,
    /// Pool time of the latest snapshot of this device.
    pub snap_time: u32,
    /// Mapping runs in increasing virtual-block order.
    pub mappings: Vec<MappingRun>,
}

impl DeviceXml {
    /// Every single mapping `(virtual block, data block, time)` in order.
    pub fn singles(&self) -> impl Iterator<Item = (u64, u64, u32)> + '_ {
        self.mappings.iter().flat_map(MappingRun::iter)
    }

    /// Total number of mapped virtual blocks (sum of run lengths).
    pub fn nr_mappings(&self) -> u64 {
        self.mappings.iter().map(|r| r.length).sum()
    }

    /// Builds the run list from single mappings given in increasing virtual-block order.
    pub fn set_singles(&mut self, singles: impl IntoIterator<Item = (u64, u64, u32)>) {
        let mut runs = RunBuilder::default();
        for (origin, data, time) in singles {
            runs.push(MappingRun::single(origin, data, time));
        }
        self.mappings = runs.finish();
    }
}

/// Coalesces mappings pushed in virtual-block order into maximal runs (thin_dump's rule).
#[derive(Debug, Default)]
pub struct RunBuilder {
    runs: Vec<MappingRun>,
}

impl RunBuilder {
    /// Appends a run, merging it with the previous one when it continues it.
    pub fn push(&mut self, run: MappingRun) {
        if let Some(last) = self.runs.last_mut() {
            if last.continued_by(&run) {
                last.length += run.length;
                return;
            }
        }
        self.runs.push(run);
    }

    /// The maximal runs.
    pub fn finish(self) -> Vec<MappingRun> {
        self.runs
    }
}

/// A whole metadata dump: the superblock attributes and the devices in `dev_id` order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PoolXml {
    /// Superblock uuid as printed (thin_dump prints "" for the all-zero uuid).
    pub uuid: String,
    /// Pool time.
    pub time: u32,
    /// Userspace transaction id.
    pub transaction: u64,
    /// Superblock flags.
    pub flags: u32,
    /// Format version (2).
    pub version: u32,
    /// Data block size in 512-byte sectors.
    pub data_block_size: u32,
    /// Number of data blocks in the data space map.
    pub nr_data_blocks: u64,
    /// Devices in increasing `dev_id` order.
    pub devices: Vec<DeviceXml>,
}

impl PoolXml {
    /// Renders the dump exactly as thin_dump 0.9.0 does (mapping runs re-coalesced).
    pub fn to_xml(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = self.write_xml(&mut out);
        out
    }

    /// Writes the dump to `out` (see [`PoolXml::to_xml`]).
    pub fn write_xml<W: fmt::Write>(&self, out: &mut W) -> fmt::Result {
        writeln!(
            out,
            "<superblock uuid=\"{}\" time=\"{}\" transaction=\"{}\" flags=\"{}\" version=\"{}\" \
             data_block_size=\"{}\" nr_data_blocks=\"{}\">",
            escape(&self.uuid),
            self.time,
            self.transaction,
            self.flags,
            self.version,
            self.data_block_size,
            self.nr_data_blocks
        )?;
        for dev in &self.devices {
            write_device(out, dev)?;
        }
        writeln!(out, "</superblock>")
    }

    /// Checks the cross-field rules the parser enforces (sorted, unique, in range).
    pub fn validate(&self) -> Result<(), XmlError> {
        let mut prev_dev: Option<u64> = None;
        for dev in &self.devices {
            if prev_dev.is_some_and(|p| p >= dev.dev_id) {
                return Err(XmlError::new(
                    0,
                    format!("device {} out of order", dev.dev_id),
                ));
            }
            prev_dev = Some(dev.dev_id);
            validate_runs(dev.dev_id, &dev.mappings, 0)?;
        }
        Ok(())
    }
}

fn write_device<W: fmt::Write>(out: &mut W, dev: &DeviceXml) -> fmt::Result {
    writeln!(
        out,
        "  <device dev_id=\"{}\" mapped_blocks=\"{}\" transaction=\"{}\" creation_time=\"{}\" \
         snap_time=\"{}\">",
        dev.dev_id, dev.mapped_blocks, dev.transaction, dev.creation_time, dev.snap_time
    )?;
    let mut runs = RunBuilder::default();
    for run in &dev.mappings {
        runs.push(*run);
    }
    for run in runs.finish() {
        write_run(out, &run)?;
    }
    writeln!(out, "  </device>")
}

/// Writes one mapping line (single or range) with thin_dump's indentation.
pub fn write_run<W: fmt::Write>(out: &mut W, run: &MappingRun) -> fmt::Result {
    if run.length == 1 {
        writeln!(
            out,
            "    <single_mapping origin_block=\"{}\" data_block=\"{}\" time=\"{}\"/>",
            run.origin_begin, run.data_begin, run.time
        )
    } else {
        writeln!(
            out,
            "    <range_mapping origin_begin=\"{}\" data_begin=\"{}\" length=\"{}\" time=\"{}\"/>",
            run.origin_begin, run.data_begin, run.length, run.time
        )
    }
}

fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c => out.push(c),
        }
    }
    out
}

/// A parse or validation error, with the 1-based line it was found on (0 = not tied to one).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct XmlError {
    /// 1-based line number, 0 when the error concerns the document as a whole.
    pub line: usize,
    /// What was wrong.
    pub msg: String,
}

impl XmlError {
    fn new(line: usize, msg: impl Into<String>) -> Self {
        XmlError {
            line,
            msg: msg.into(),
        }
    }
}

impl fmt::Display for XmlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "xml: {}", self.msg)
        } else {
            write!(f, "xml line {}: {}", self.line, self.msg)
        }
    }
}

impl std::error::Error for XmlError {}

fn validate_runs(dev_id: u64, runs: &[MappingRun], line: usize) -> Result<(), XmlError> {
    let mut next_free: u64 = 0;
    for (i, run) in runs.iter().enumerate() {
        let err = |m: String| Err(XmlError::new(line, format!("device {dev_id}: {m}")));
        if run.length == 0 {
            return err("mapping of length 0".into());
        }
        let Some(origin_end) = run.origin_begin.checked_add(run.length) else {
            return err(format!("mapping at {} overflows", run.origin_begin));
        };
        match run.data_begin.checked_add(run.length - 1) {
            Some(last) if last <= MAX_DATA_BLOCK => {}
            _ => return err(format!("data block beyond 2^40 at {}", run.origin_begin)),
        }
        if run.time > MAX_MAPPING_TIME {
            return err(format!("time {} does not fit in 24 bits", run.time));
        }
        if i > 0 && run.origin_begin < next_free {
            return err(format!(
                "mappings overlap or are unsorted at {}",
                run.origin_begin
            ));
        }
        next_free = origin_end;
    }
    Ok(())
}

// ------------------------------------------------------------------------------------------
// Parser
// ------------------------------------------------------------------------------------------

/// Parses a thin_dump XML document. Mappings of each device are sorted by virtual block
/// (thin_restore accepts any order); overlapping mappings, duplicate devices, out-of-range
/// numbers and unknown elements or attributes are errors.
pub fn parse(text: &str) -> Result<PoolXml, XmlError> {
    let mut lexer = Lexer {
        src: text.as_bytes(),
        pos: 0,
        lines: Cell::new((0, 0)),
    };
    let mut pool: Option<PoolXml> = None;
    let mut devices: BTreeMap<u64, (DeviceXml, usize)> = BTreeMap::new();
    let mut current: Option<(DeviceXml, usize)> = None;
    let mut closed = false;
    while let Some(tok) = lexer.next_token()? {
        let line = tok.line;
        match (tok.kind, pool.is_some(), current.is_some(), closed) {
            (_, _, _, true) => return Err(XmlError::new(line, "content after </superblock>")),
            (TokKind::Start { name, attrs, empty }, false, _, _) => {
                if name != "superblock" {
                    return Err(XmlError::new(
                        line,
                        format!("expected <superblock>, got <{name}>"),
                    ));
                }
                pool = Some(superblock_from(&attrs, line)?);
                if empty {
                    closed = true;
                }
            }
            (TokKind::Start { name, attrs, empty }, true, false, _) => {
                if name != "device" {
                    return Err(XmlError::new(
                        line,
                        format!("expected <device>, got <{name}>"),
                    ));
                }
                let dev = device_from(&attrs, line)?;
                if devices.contains_key(&dev.dev_id) {
                    return Err(XmlError::new(
                        line,
                        format!("duplicate device {}", dev.dev_id),
                    ));
                }
                if empty {
                    devices.insert(dev.dev_id, (dev, line));
                } else {
                    current = Some((dev, line));
                }
            }
            (TokKind::Start { name, attrs, empty }, true, true, _) => {
                let run = mapping_from(&name, &attrs, line)?;
                if let Some((dev, _)) = current.as_mut() {
                    dev.mappings.push(run);
                }
                if !empty {
                    lexer.expect_end(&name)?;
                }
            }
            (TokKind::End(name), true, true, _) if name == "device" => {
                if let Some((dev, l)) = current.take() {
                    devices.insert(dev.dev_id, (dev, l));
                }
            }
            (TokKind::End(name), true, false, _) if name == "superblock" => closed = true,
            (TokKind::End(name), _, _, _) => {
                return Err(XmlError::new(line, format!("unexpected </{name}>")));
            }
        }
    }
    let Some(mut pool) = pool else {
        return Err(XmlError::new(0, "no <superblock> element"));
    };
    if !closed {
        return Err(XmlError::new(
            0,
            "missing </superblock> (truncated document?)",
        ));
    }
    for (_, (mut dev, line)) in devices {
        dev.mappings.sort_by_key(|r| r.origin_begin);
        validate_runs(dev.dev_id, &dev.mappings, line)?;
        pool.devices.push(dev);
    }
    Ok(pool)
}

type Attrs = Vec<(String, String)>;

fn superblock_from(attrs: &Attrs, line: usize) -> Result<PoolXml, XmlError> {
    let mut f = Fields::new(attrs, line, "superblock")?;
    let pool = PoolXml {
        uuid: f.take_str("uuid")?,
        time: f.take_num("time")?,
        transaction: f.take_num("transaction")?,
        flags: f.take_num_or("flags", 0)?,
        version: f.take_num_or("version", 2)?,
        data_block_size: f.take_num("data_block_size")?,
        nr_data_blocks: f.take_num("nr_data_blocks")?,
        devices: Vec::new(),
    };
    f.finish()?;
    Ok(pool)
}

fn device_from(attrs: &Attrs, line: usize) -> Result<DeviceXml, XmlError> {
    let mut f = Fields::new(attrs, line, "device")?;
    let dev = DeviceXml {
        dev_id: f.take_num("dev_id")?,
        mapped_blocks: f.take_num("mapped_blocks")?,
        transaction: f.take_num("transaction")?,
        creation_time: f.take_num("creation_time")?,
        snap_time: f.take_num("snap_time")?,
        mappings: Vec::new(),
    };
    f.finish()?;
    Ok(dev)
}

fn mapping_from(name: &str, attrs: &Attrs, line: usize) -> Result<MappingRun, XmlError> {
    let mut f = Fields::new(attrs, line, name)?;
    let run = match name {
        "single_mapping" => MappingRun {
            origin_begin: f.take_num("origin_block")?,
            data_begin: f.take_num("data_block")?,
            length: 1,
            time: f.take_num("time")?,
        },
        "range_mapping" => MappingRun {
            origin_begin: f.take_num("origin_begin")?,
            data_begin: f.take_num("data_begin")?,
            length: f.take_num("length")?,
            time: f.take_num("time")?,
        },
        other => {
            return Err(XmlError::new(
                line,
                format!("unexpected <{other}> in <device>"),
            ))
        }
    };
    f.finish()?;
    Ok(run)
}

/// Attribute bag that insists every attribute is used exactly once.
struct Fields<'a> {
    attrs: Vec<Option<&'a (String, String)>>,
    line: usize,
    elem: &'a str,
}

impl<'a> Fields<'a> {
    fn new(attrs: &'a Attrs, line: usize, elem: &'a str) -> Result<Self, XmlError> {
        if attrs.len() > MAX_ATTRIBUTES {
            return Err(XmlError::new(
                line,
                format!("too many attributes on <{elem}>"),
            ));
        }
        for (i, (k, _)) in attrs.iter().enumerate() {
            if attrs.iter().skip(i + 1).any(|(k2, _)| k2 == k) {
                return Err(XmlError::new(
                    line,
                    format!("duplicate attribute {k} on <{elem}>"),
                ));
            }
        }
        Ok(Fields {
            attrs: attrs.iter().map(Some).collect(),
            line,
            elem,
        })
    }

    fn take(&mut self, key: &str) -> Option<&'a str> {
        for slot in self.attrs.iter_mut() {
            if slot.is_some_and(|(k, _)| k == key) {
                return slot.take().map(|(_, v)| v.as_str());
            }
        }
        None
    }

    fn take_str(&mut self, key: &str) -> Result<String, XmlError> {
        match self.take(key) {
            Some(v) => Ok(v.to_string()),
            None => Err(self.missing(key)),
        }
    }

    fn take_num<T: std::str::FromStr>(&mut self, key: &str) -> Result<T, XmlError> {
        match self.take(key) {
            Some(v) => self.number(key, v),
            None => Err(self.missing(key)),
        }
    }

    fn take_num_or<T: std::str::FromStr>(&mut self, key: &str, dflt: T) -> Result<T, XmlError> {
        match self.take(key) {
            Some(v) => self.number(key, v),
            None => Ok(dflt),
        }
    }

    fn number<T: std::str::FromStr>(&self, key: &str, v: &str) -> Result<T, XmlError> {
        let digits = v.trim();
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(XmlError::new(
                self.line,
                format!("<{}> {key}=\"{v}\" is not an unsigned number", self.elem),
            ));
        }
        digits.parse().map_err(|_| {
            XmlError::new(
                self.line,
                format!("<{}> {key}=\"{v}\" is out of range", self.elem),
            )
        })
    }

    fn missing(&self, key: &str) -> XmlError {
        XmlError::new(self.line, format!("<{}> lacks attribute {key}", self.elem))
    }

    fn finish(self) -> Result<(), XmlError> {
        match self.attrs.into_iter().flatten().next() {
            Some((k, _)) => Err(XmlError::new(
                self.line,
                format!("unknown attribute {k} on <{}>", self.elem),
            )),
            None => Ok(()),
        }
    }
}

enum TokKind {
    Start {
        name: String,
        attrs: Attrs,
        empty: bool,
    },
    End(String),
}

struct Token {
    kind: TokKind,
    line: usize,
}

struct Lexer<'a> {
    src: &'a [u8],
    pos: usize,
    /// `(position, newlines before it)`: line numbers are counted incrementally, since
    /// positions only move forward, to keep the lexer linear in the document size.
    lines: Cell<(usize, usize)>,
}

impl Lexer<'_> {
    fn line_at(&self, pos: usize) -> usize {
        let (mut from, mut count) = self.lines.get();
        if pos < from {
            (from, count) = (0, 0);
        }
        count += self
            .src
            .get(from..pos)
            .unwrap_or_default()
            .iter()
            .filter(|&&b| b == b'\n')
            .count();
        self.lines.set((pos, count));
        1 + count
    }

    fn err(&self, msg: impl Into<String>) -> XmlError {
        XmlError::new(self.line_at(self.pos), msg)
    }

    fn peek(&self) -> Option<u8> {
        self.src.get(self.pos).copied()
    }

    fn starts_with(&self, s: &str) -> bool {
        self.src
            .get(self.pos..)
            .is_some_and(|rest| rest.starts_with(s.as_bytes()))
    }

    fn skip_ws(&mut self) {
        while self.peek().is_some_and(|b| b.is_ascii_whitespace()) {
            self.pos += 1;
        }
    }

    fn skip_past(&mut self, end: &str) -> Result<(), XmlError> {
        while self.pos < self.src.len() {
            if self.starts_with(end) {
                self.pos += end.len();
                return Ok(());
            }
            self.pos += 1;
        }
        Err(self.err(format!("unterminated construct, expected {end}")))
    }

    /// Next element tag, skipping whitespace, comments, the prolog and doctype.
    fn next_token(&mut self) -> Result<Option<Token>, XmlError> {
        loop {
            self.skip_ws();
            match self.peek() {
                None => return Ok(None),
                Some(b'<') => {}
                Some(_) => return Err(self.err("unexpected text outside tags")),
            }
            if self.starts_with("<?") {
                self.skip_past("?>")?;
            } else if self.starts_with("<!--") {
                self.skip_past("-->")?;
            } else if self.starts_with("<!") {
                self.skip_past(">")?;
            } else {
                break;
            }
        }
        let line = self.line_at(self.pos);
        self.pos += 1;
        if self.peek() == Some(b'/') {
            self.pos += 1;
            let name = self.name()?;
            self.skip_ws();
            self.expect(b'>')?;
            return Ok(Some(Token {
                kind: TokKind::End(name),
                line,
            }));
        }
        let name = self.name()?;
        let mut attrs = Attrs::new();
        loop {
            self.skip_ws();
            match self.peek() {
                Some(b'/') => {
                    self.pos += 1;
                    self.expect(b'>')?;
                    return Ok(Some(Token {
                        kind: TokKind::Start {
                            name,
                            attrs,
                            empty: true,
                        },
                        line,
                    }));
                }
                Some(b'>') => {
                    self.pos += 1;
                    return Ok(Some(Token {
                        kind: TokKind::Start {
                            name,
                            attrs,
                            empty: false,
                        },
                        line,
                    }));
                }
                Some(_) => {
                    if attrs.len() >= MAX_ATTRIBUTES {
                        return Err(self.err(format!("too many attributes on <{name}>")));
                    }
                    let key = self.name()?;
                    self.skip_ws();
                    self.expect(b'=')?;
                    self.skip_ws();
                    let value = self.quoted()?;
                    attrs.push((key, value));
                }
                None => return Err(self.err(format!("unterminated <{name}"))),
            }
        }
    }

    fn expect_end(&mut self, name: &str) -> Result<(), XmlError> {
        match self.next_token()? {
            Some(Token {
                kind: TokKind::End(n),
                ..
            }) if n == name => Ok(()),
            _ => Err(self.err(format!("<{name}> must be empty and closed by </{name}>"))),
        }
    }

    fn expect(&mut self, b: u8) -> Result<(), XmlError> {
        if self.peek() == Some(b) {
            self.pos += 1;
            Ok(())
        } else {
            Err(self.err(format!("expected '{}'", b as char)))
        }
    }

    fn name(&mut self) -> Result<String, XmlError> {
        let start = self.pos;
        while self
            .peek()
            .is_some_and(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b':' | b'.'))
        {
            self.pos += 1;
        }
        let bytes = self.src.get(start..self.pos).unwrap_or_default();
        if bytes.is_empty() {
            return Err(self.err("expected a name"));
        }
        Ok(String::from_utf8_lossy(bytes).into_owned())
    }

    fn quoted(&mut self) -> Result<String, XmlError> {
        let quote = match self.peek() {
            Some(q @ (b'"' | b'\'')) => q,
            _ => return Err(self.err("expected a quoted attribute value")),
        };
        self.pos += 1;
        let start = self.pos;
        while self.peek().is_some_and(|b| b != quote && b != b'<') {
            self.pos += 1;
        }
        let raw = self.src.get(start..self.pos).unwrap_or_default();
        self.expect(quote)?;
        let raw = std::str::from_utf8(raw).map_err(|_| self.err("attribute is not UTF-8"))?;
        unescape(raw).ok_or_else(|| self.err(format!("bad entity in \"{raw}\"")))
    }
}

fn unescape(s: &str) -> Option<String> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('&') {
        out.push_str(rest.get(..i)?);
        let after = rest.get(i..)?;
        let end = after.find(';')?;
        let ent = after.get(1..end)?;
        out.push(match ent {
            "amp" => '&',
            "lt" => '<',
            "gt" => '>',
            "quot" => '"',
            "apos" => '\'',
            _ => {
                let code = if let Some(hex) = ent.strip_prefix("#x") {
                    u32::from_str_radix(hex, 16).ok()?
                } else {
                    ent.strip_prefix('#')?.parse().ok()?
                };
                char::from_u32(code)?
            }
        });
        rest = after.get(end + 1..)?;
    }
    out.push_str(rest);
    Some(out)
}

#[cfg(test)]
#[allow(clippy::indexing_slicing)]
mod tests {
    use super::*;

    const A: &str = r#"<superblock uuid="" time="1" transaction="5" flags="0" version="2" data_block_size="128" nr_data_blocks="1000">
  <device dev_id="1" mapped_blocks="3" transaction="0" creation_time="0" snap_time="1">
    <range_mapping origin_begin="0" data_begin="10" length="2" time="0"/>
    <single_mapping origin_block="100" data_block="20" time="1"/>
  </device>
  <device dev_id="2" mapped_blocks="2" transaction="3" creation_time="1" snap_time="1">
    <range_mapping origin_begin="0" data_begin="10" length="2" time="0"/>
  </device>
</superblock>
"#;

    #[test]
    fn round_trip_is_byte_exact() {
        let pool = parse(A).expect("parses");
        assert_eq!(pool.devices.len(), 2);
        assert_eq!(pool.devices[0].nr_mappings(), 3);
        assert_eq!(pool.to_xml(), A);
    }

    #[test]
    fn singles_coalesce_like_thin_dump() {
        let mut dev = DeviceXml {
            dev_id: 3,
            ..Default::default()
        };
        dev.set_singles([
            (0, 10, 0),
            (1, 11, 1),
            (2, 12, 1),
            (3, 14, 1),
            (5, 15, 1),
            (6, 15, 1),
        ]);
        let lens: Vec<u64> = dev.mappings.iter().map(|r| r.length).collect();
        assert_eq!(lens, vec![1, 2, 1, 1, 1]);
        // Adjacent range_mappings that continue each other print as one.
        let text = A.replace(
            r#"<single_mapping origin_block="100" data_block="20" time="1"/>"#,
            r#"<range_mapping origin_begin="2" data_begin="12" length="3" time="0"/>"#,
        );
        let out = parse(&text).expect("parses").to_xml();
        assert!(
            out.contains(r#"origin_begin="0" data_begin="10" length="5" time="0""#),
            "{out}"
        );
    }

    #[test]
    fn rejects_bad_input_with_line_numbers() {
        let cases: &[(&str, usize)] = &[
            ("", 0),
            ("<superblock", 1),
            ("<device dev_id=\"1\"/>", 1),
            (
                &A.replace(
                    "time=\"1\" transaction=\"5\"",
                    "time=\"x\" transaction=\"5\"",
                ),
                1,
            ),
            (&A.replace("dev_id=\"2\"", "dev_id=\"1\""), 6),
            (
                &A.replace(
                    "length=\"2\" time=\"0\"/>\n  </device>\n</superblock>",
                    "length=\"0\" time=\"0\"/>\n  </device>\n</superblock>",
                ),
                6,
            ),
            (
                &A.replace("data_block=\"20\"", "data_block=\"1099511627776\""),
                2,
            ),
            (&A.replace("time=\"1\"/>", "time=\"16777216\"/>"), 2),
            (&A.replace("origin_block=\"100\"", "origin_block=\"1\""), 2),
            (&A.replace("</superblock>\n", ""), 0),
            (&format!("{A}<superblock/>"), 10),
            (
                &A.replace("snap_time=\"1\">", "snap_time=\"1\" bogus=\"1\">"),
                2,
            ),
            (&A.replace("uuid=\"\"", "uuid=\"&bogus;\""), 1),
        ];
        for (text, line) in cases {
            let err = parse(text).expect_err(text);
            assert_eq!(err.line, *line, "{err} for {text:?}");
        }
    }

    #[test]
    fn accepts_prolog_comments_and_any_attribute_order() {
        let text = "<?xml version=\"1.0\"?>\n<!-- c -->\n<superblock nr_data_blocks='9' \
                    data_block_size='128' transaction='0' time='0' uuid='a&amp;b'>\n\
                    <device snap_time='0' creation_time='0' transaction='0' mapped_blocks='1' \
                    dev_id='4'><single_mapping time='0' data_block='8' origin_block='2'>\
                    </single_mapping></device></superblock>";
        let pool = parse(text).expect("parses");
        assert_eq!(pool.uuid, "a&b");
        assert_eq!(pool.devices[0].mappings, vec![MappingRun::single(2, 8, 0)]);
        assert!(pool.to_xml().starts_with("<superblock uuid=\"a&amp;b\""));
    }

    #[test]
    fn garbage_never_panics() {
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        let bytes = A.as_bytes();
        for _ in 0..2000 {
            let mut v = bytes.to_vec();
            for _ in 0..4 {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                let i = (seed as usize) % v.len();
                v[i] = (seed >> 32) as u8;
            }
            let cut = (seed >> 40) as usize % (v.len() + 1);
            let _ = parse(&String::from_utf8_lossy(&v[..cut]));
        }
    }
}
