//! Reading delimited release files (LOINC CSV, SNOMED RF2 TSV, CMS GEM CSV) by header name,
//! with errors that name the file, line and column.

use std::collections::HashMap;
use std::path::Path;

/// A load error: file, 1-based line and column, message.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{file}:{line}:{column}: {message}")]
pub struct FileError {
    pub file: String,
    pub line: usize,
    pub column: usize,
    pub message: String,
}

/// One data row: its 1-based line number and fields.
#[derive(Debug, Clone)]
pub struct Row {
    pub line: usize,
    pub fields: Vec<String>,
}

/// A parsed file: header → column index, rows.
#[derive(Debug)]
pub struct Table {
    pub file: String,
    pub columns: HashMap<String, usize>,
    pub rows: Vec<Row>,
}

impl Table {
    /// Index of a required column (error at line 1 when absent).
    pub fn col(&self, name: &str) -> Result<usize, FileError> {
        self.columns.get(name).copied().ok_or_else(|| FileError {
            file: self.file.clone(),
            line: 1,
            column: 1,
            message: format!("required column '{name}' is missing from the header"),
        })
    }
    pub fn opt_col(&self, name: &str) -> Option<usize> {
        self.columns.get(name).copied()
    }
    pub fn error(&self, row: &Row, col: usize, message: impl Into<String>) -> FileError {
        FileError {
            file: self.file.clone(),
            line: row.line,
            column: col + 1,
            message: message.into(),
        }
    }
}

/// The 1-based (line, column) of byte offset `pos` in `text` (column counted in characters).
pub fn line_col(text: &str, pos: usize) -> (usize, usize) {
    let mut pos = pos.min(text.len());
    while !text.is_char_boundary(pos) {
        pos -= 1;
    }
    let before = &text[..pos];
    let line = 1 + before.bytes().filter(|b| *b == b'\n').count();
    let start = before.rfind('\n').map(|i| i + 1).unwrap_or(0);
    (line, 1 + before[start..].chars().count())
}

pub fn read_file(path: &Path) -> Result<String, FileError> {
    let bytes = std::fs::read(path).map_err(|e| FileError {
        file: path.display().to_string(),
        line: 0,
        column: 0,
        message: e.to_string(),
    })?;
    String::from_utf8(bytes).map_err(|e| {
        let upto = e.utf8_error().valid_up_to();
        FileError {
            file: path.display().to_string(),
            line: 1 + e.as_bytes()[..upto].iter().filter(|b| **b == b'\n').count(),
            column: 0,
            message: "file is not valid UTF-8".into(),
        }
    })
}

/// Where progress lines go (see `with_progress`).
type ProgressSink = Option<Box<dyn Fn(&str)>>;

thread_local! {
    static PROGRESS: std::cell::RefCell<ProgressSink> = const { std::cell::RefCell::new(None) };
}

/// Runs `body` with `sink` receiving progress lines from the readers on this thread (one line
/// per release file read: its name and row count). Used by `kiln terminology load`.
pub fn with_progress<R>(sink: impl Fn(&str) + 'static, body: impl FnOnce() -> R) -> R {
    struct Reset;
    impl Drop for Reset {
        fn drop(&mut self) {
            PROGRESS.with(|p| *p.borrow_mut() = None);
        }
    }
    PROGRESS.with(|p| *p.borrow_mut() = Some(Box::new(sink)));
    let _reset = Reset;
    body()
}

/// Sends a progress line to the sink installed by `with_progress`, if any.
pub fn progress(line: &str) {
    PROGRESS.with(|p| {
        if let Some(f) = p.borrow().as_ref() {
            f(line)
        }
    });
}

fn short_name(file: &str) -> &str {
    file.rsplit(['/', '\\']).next().unwrap_or(file)
}

/// The header of a streamed file: column names → index.
#[derive(Debug, Clone)]
pub struct Header {
    pub file: String,
    pub columns: HashMap<String, usize>,
    pub width: usize,
}

impl Header {
    /// Index of a required column (error at line 1 when absent).
    pub fn col(&self, name: &str) -> Result<usize, FileError> {
        self.columns.get(name).copied().ok_or_else(|| FileError {
            file: self.file.clone(),
            line: 1,
            column: 1,
            message: format!("required column '{name}' is missing from the header"),
        })
    }
    pub fn opt_col(&self, name: &str) -> Option<usize> {
        self.columns.get(name).copied()
    }
    pub fn error(&self, line: usize, col: usize, message: impl Into<String>) -> FileError {
        FileError {
            file: self.file.clone(),
            line,
            column: col + 1,
            message: message.into(),
        }
    }
}

/// A streaming reader of a tab-separated (RF2) text: rows are borrowed slices of the text, so a
/// 1.5 M-row description file is never held as millions of `String`s.
pub struct TsvRows<'a> {
    lines: std::iter::Enumerate<std::str::Split<'a, char>>,
    header: Header,
    fields: Vec<&'a str>,
    rows: usize,
    done: bool,
}

impl<'a> TsvRows<'a> {
    pub fn new(text: &'a str, file: &str) -> Result<Self, FileError> {
        let text = text.trim_start_matches('\u{feff}');
        let mut lines = text.split('\n').enumerate();
        let header = match lines.next() {
            Some((_, h)) if !h.trim().is_empty() => h.trim_end_matches('\r'),
            _ => {
                return Err(FileError {
                    file: file.into(),
                    line: 1,
                    column: 1,
                    message: "empty file: no header row".into(),
                })
            }
        };
        let names: Vec<&str> = header.split('\t').collect();
        let header = Header {
            file: file.into(),
            width: names.len(),
            columns: names
                .iter()
                .enumerate()
                .map(|(i, n)| (n.trim().to_string(), i))
                .collect(),
        };
        Ok(TsvRows {
            lines,
            header,
            fields: Vec::with_capacity(16),
            rows: 0,
            done: false,
        })
    }

    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The next data row as (1-based line number, fields); `None` at the end of the file.
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> Option<Result<(usize, &[&'a str]), FileError>> {
        for (i, l) in self.lines.by_ref() {
            let l = l.trim_end_matches('\r');
            if l.is_empty() {
                continue;
            }
            self.fields.clear();
            self.fields.extend(l.split('\t'));
            if self.fields.len() != self.header.width {
                return Some(Err(FileError {
                    file: self.header.file.clone(),
                    line: i + 1,
                    column: self.fields.len().min(self.header.width) + 1,
                    message: format!(
                        "expected {} tab-separated fields, found {}",
                        self.header.width,
                        self.fields.len()
                    ),
                }));
            }
            self.rows += 1;
            return Some(Ok((i + 1, &self.fields)));
        }
        if !self.done {
            self.done = true;
            progress(&format!(
                "{}: {} rows",
                short_name(&self.header.file),
                self.rows
            ));
        }
        None
    }
}

/// A streaming reader of a comma-separated text with RFC 4180 quoting (`"…"`, `""` escapes,
/// quoted newlines) and a header row: one record is materialised at a time, so a LOINC table of
/// 100,000 rows × 40 columns is never held as millions of `String`s.
pub struct CsvRows<'a> {
    chars: std::iter::Peekable<std::str::Chars<'a>>,
    file: String,
    width: usize,
    line: usize,
    rows: usize,
    done: bool,
}

impl<'a> CsvRows<'a> {
    /// Reads the header row; returns it as a `Table` without rows (for `col`/`opt_col`/`error`)
    /// and the reader of the data rows.
    pub fn new(text: &'a str, file: &str) -> Result<(Table, CsvRows<'a>), FileError> {
        let text = text.trim_start_matches('\u{feff}');
        let mut r = CsvRows {
            chars: text.chars().peekable(),
            file: file.into(),
            width: 0,
            line: 1,
            rows: 0,
            done: false,
        };
        let header = match r.record()? {
            Some(h) => h,
            None => {
                return Err(FileError {
                    file: file.into(),
                    line: 1,
                    column: 1,
                    message: "empty file: no header row".into(),
                })
            }
        };
        r.width = header.fields.len();
        let columns = header
            .fields
            .iter()
            .enumerate()
            .map(|(i, h)| (h.trim().to_string(), i))
            .collect();
        Ok((
            Table {
                file: file.into(),
                columns,
                rows: Vec::new(),
            },
            r,
        ))
    }

    /// The next data row; `None` at the end of the file.
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> Option<Result<Row, FileError>> {
        match self.record() {
            Ok(Some(r)) if r.fields.len() != self.width => Some(Err(FileError {
                file: self.file.clone(),
                line: r.line,
                column: r.fields.len().min(self.width) + 1,
                message: format!(
                    "expected {} comma-separated fields, found {}",
                    self.width,
                    r.fields.len()
                ),
            })),
            Ok(Some(r)) => {
                self.rows += 1;
                Some(Ok(r))
            }
            Ok(None) => {
                if !self.done {
                    self.done = true;
                    progress(&format!("{}: {} rows", short_name(&self.file), self.rows));
                }
                None
            }
            Err(e) => Some(Err(e)),
        }
    }

    /// The next record (blank lines skipped), header included.
    fn record(&mut self) -> Result<Option<Row>, FileError> {
        let mut fields: Vec<String> = Vec::new();
        let mut field = String::new();
        let mut col = 1usize;
        let mut rec_line = self.line;
        let mut in_quotes = false;
        let mut quoted_field = false;
        let mut quote_start = (0, 0);
        let file = &self.file;
        let err = |line: usize, column: usize, m: &str| FileError {
            file: file.clone(),
            line,
            column,
            message: m.into(),
        };
        while let Some(c) = self.chars.next() {
            if in_quotes {
                match c {
                    '"' if self.chars.peek() == Some(&'"') => {
                        self.chars.next();
                        field.push('"');
                        col += 2;
                    }
                    '"' => {
                        in_quotes = false;
                        col += 1;
                        match self.chars.peek() {
                            None | Some(',') | Some('\n') | Some('\r') => {}
                            Some(_) => {
                                return Err(err(
                                    self.line,
                                    col,
                                    "unexpected character after closing quote",
                                ))
                            }
                        }
                    }
                    '\n' => {
                        field.push('\n');
                        self.line += 1;
                        col = 1;
                    }
                    _ => {
                        field.push(c);
                        col += 1;
                    }
                }
                continue;
            }
            match c {
                '"' if field.is_empty() && !quoted_field => {
                    in_quotes = true;
                    quoted_field = true;
                    quote_start = (self.line, col);
                    col += 1;
                }
                '"' => return Err(err(self.line, col, "quote inside an unquoted field")),
                ',' => {
                    fields.push(std::mem::take(&mut field));
                    quoted_field = false;
                    col += 1;
                }
                '\r' => {}
                '\n' => {
                    fields.push(std::mem::take(&mut field));
                    quoted_field = false;
                    self.line += 1;
                    col = 1;
                    if !(fields.len() == 1 && fields[0].is_empty()) {
                        return Ok(Some(Row {
                            line: rec_line,
                            fields,
                        }));
                    }
                    fields.clear();
                    rec_line = self.line;
                }
                _ => {
                    field.push(c);
                    col += 1;
                }
            }
        }
        if in_quotes {
            return Err(err(
                quote_start.0,
                quote_start.1,
                "unterminated quoted field",
            ));
        }
        if !field.is_empty() || !fields.is_empty() || quoted_field {
            fields.push(field);
            return Ok(Some(Row {
                line: rec_line,
                fields,
            }));
        }
        Ok(None)
    }
}

/// Comma-separated with RFC 4180 quoting, header row: every row materialised (small files; the
/// large LOINC files are read with `CsvRows`).
pub fn parse_csv(text: &str, file: &str) -> Result<Table, FileError> {
    let (mut table, mut rows) = CsvRows::new(text, file)?;
    while let Some(r) = rows.next() {
        table.rows.push(r?);
    }
    Ok(table)
}

/// Every file under `dir` (recursively) whose name starts with `prefix`, sorted by path.
pub fn find_files(dir: &Path, prefix: &str) -> Vec<std::path::PathBuf> {
    let mut stack = vec![dir.to_path_buf()];
    let mut found: Vec<std::path::PathBuf> = Vec::new();
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p
                .file_name()
                .map(|n| n.to_string_lossy().starts_with(prefix))
                .unwrap_or(false)
            {
                found.push(p);
            }
        }
    }
    found.sort();
    found
}

/// Finds the first file under `dir` (recursively) whose name starts with `prefix`.
pub fn find_file(dir: &Path, prefix: &str) -> Option<std::path::PathBuf> {
    find_files(dir, prefix).into_iter().next()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_quoting_and_errors() {
        let t = parse_csv(
            "\"A\",\"B\"\r\n\"1\",\"x, \"\"y\"\"\"\n\"2\",\"multi\nline\"\n",
            "f.csv",
        )
        .unwrap();
        assert_eq!(t.rows.len(), 2);
        assert_eq!(t.rows[0].fields[1], "x, \"y\"");
        assert_eq!(t.rows[1].fields[1], "multi\nline");
        assert_eq!(t.rows[1].line, 3);
        let e = parse_csv("A,B\n1,2\n3\n", "f.csv").unwrap_err();
        assert_eq!((e.line, e.file.as_str()), (3, "f.csv"));
        let e = parse_csv("A,B\n1,\"2\n", "f.csv").unwrap_err();
        assert_eq!((e.line, e.column), (2, 3));
        assert!(e.message.contains("unterminated"));
        let e = parse_csv("A,B\n1,2\"x\n", "f.csv").unwrap_err();
        assert_eq!((e.line, e.column), (2, 4));
    }

    #[test]
    fn csv_rows_stream_one_record_at_a_time() {
        let text = "\u{feff}A,B\n\n1,\"two\nlines\"\n3,4\n5\n6,7\n";
        let (t, mut rows) = CsvRows::new(text, "s.csv").unwrap();
        assert_eq!((t.col("A").unwrap(), t.col("B").unwrap()), (0, 1));
        assert!(t.rows.is_empty());
        assert!(t.col("C").unwrap_err().message.contains("'C'"));
        let r = rows.next().unwrap().unwrap();
        assert_eq!(
            (r.line, r.fields.clone()),
            (3, vec!["1".to_string(), "two\nlines".into()])
        );
        let r = rows.next().unwrap().unwrap();
        assert_eq!((r.line, r.fields[1].as_str()), (5, "4"));
        // a short row is an error at its own line; reading goes on after it
        let e = rows.next().unwrap().unwrap_err();
        assert_eq!((e.line, e.column, e.file.as_str()), (6, 2, "s.csv"));
        assert_eq!(rows.next().unwrap().unwrap().fields[0], "6");
        assert!(rows.next().is_none());
        assert!(CsvRows::new("\n\n", "e.csv").is_err());
    }

    #[test]
    fn tsv_rows_by_header() {
        // BOM, CRLF line ends, a blank line, a short row
        let text = "\u{feff}id\tactive \r\n1\t1\r\n\r\n2\t0\r\n3\r\n4\t1\n";
        let mut rows = TsvRows::new(text, "dir/x.txt").unwrap();
        let h = rows.header().clone();
        assert_eq!((h.col("id").unwrap(), h.col("active").unwrap()), (0, 1));
        let missing = h.col("nope").unwrap_err();
        assert_eq!((missing.line, missing.file.as_str()), (1, "dir/x.txt"));
        assert!(missing.message.contains("'nope'"));
        let (line, fields) = rows.next().unwrap().unwrap();
        assert_eq!((line, fields.to_vec()), (2, vec!["1", "1"]));
        let (line, fields) = rows.next().unwrap().unwrap();
        assert_eq!((line, fields.to_vec()), (4, vec!["2", "0"]));
        let e = rows.next().unwrap().unwrap_err();
        assert_eq!((e.line, e.column), (5, 2));
        assert!(e
            .message
            .contains("expected 2 tab-separated fields, found 1"));
        assert_eq!(rows.next().unwrap().unwrap().1.to_vec(), vec!["4", "1"]);
        assert!(rows.next().is_none());
        assert!(TsvRows::new("\n", "empty.txt").is_err());
    }
}
