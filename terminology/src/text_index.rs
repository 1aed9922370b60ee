//! Full-text index of a code system's displays and designations (tantivy), for
//! `$expand?filter=` over large systems. The index answers exactly what the in-memory scan
//! (`provider::TextMatcher`) answers, ranked the same way, without scoring every match:
//!
//! - one document per distinct text (display or designation) of a concept, holding the
//!   concept's position (`ord`, a fast field), the whole text lowercased (`text`), its first word
//!   (`first`; also `lead` when the text starts with it) and each of its words (`word`,
//!   lowercased); the concept's first document also holds
//!   its lowercased `code`. All fields are untokenized terms: the words are split exactly as
//!   `TextMatcher` splits them, so a term lookup or a prefix walk of the term dictionary gives
//!   the same answer as the matcher's string comparisons.
//! - a query is the union of six tiers, the matcher's scores: the code equal to the text (100),
//!   a text equal to it (90), a text starting with it (80), a text whose words start with every
//!   word of the query and whose first word starts with the first one (60), a text whose words
//!   start with every word of the query (50, one text must hold all words: hence one document per
//!   text), the code starting with the text (40). Each tier is a bitset over the concepts built
//!   from posting lists; the page is read off the tiers best first, ascending position within a
//!   tier (the scan's stable tie-break), and `total` is the size of their union.
//!
//! Building is atomic: the index is written to a temporary directory and renamed into place, so
//! a failed build leaves the previous index.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tantivy::columnar::Column;
use tantivy::schema::{Field, IndexRecordOption, Schema, TextFieldIndexing, TextOptions, FAST};
use tantivy::{
    DocSet, Index, IndexReader, IndexWriter, InvertedIndexReader, TantivyDocument, TERMINATED,
};

use crate::provider::{rank_tiers, words, ConceptSet, ConceptTable, TextMatcher, TextSearcher};

/// Format of the index (in the commit payload): an index of another format is rebuilt.
const FORMAT: u32 = 2;

/// Terms longer than this (bytes) are cut at a character boundary. A query (or query word) at
/// least this long is not answered by the index (the table is scanned), so cutting never
/// changes an answer: a text starts with a shorter query iff its cut term does, and a cut term
/// never equals a shorter query.
const KEY_LIMIT: usize = 1000;

/// A text index over one `ConceptTable`.
pub struct TextIndex {
    reader: IndexReader,
    fields: Fields,
    /// Concepts of the indexed table.
    concepts: u64,
}

#[derive(Clone, Copy)]
struct Fields {
    code: Field,
    text: Field,
    first: Field,
    lead: Field,
    word: Field,
}

impl std::fmt::Debug for TextIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextIndex")
            .field("concepts", &self.concepts)
            .finish()
    }
}

fn err(e: impl std::fmt::Display) -> String {
    format!("text index: {e}")
}

fn term_options() -> TextOptions {
    TextOptions::default().set_indexing_options(
        TextFieldIndexing::default()
            .set_tokenizer("raw")
            .set_fieldnorms(false)
            .set_index_option(IndexRecordOption::Basic),
    )
}

fn schema() -> Schema {
    let mut b = Schema::builder();
    b.add_u64_field("ord", FAST);
    b.add_text_field("code", term_options());
    b.add_text_field("text", term_options());
    b.add_text_field("first", term_options());
    b.add_text_field("lead", term_options());
    b.add_text_field("word", term_options());
    b.build()
}

/// `s` cut to at most `KEY_LIMIT` bytes at a character boundary.
fn key(s: &str) -> &str {
    if s.len() <= KEY_LIMIT {
        return s;
    }
    let mut end = KEY_LIMIT;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[derive(Serialize, Deserialize)]
struct Payload {
    format: u32,
    concepts: u64,
}

/// Calls `f` with every document of the posting list of `term_info`.
fn each_doc(
    inv: &InvertedIndexReader,
    term_info: &tantivy::postings::TermInfo,
    f: &mut impl FnMut(u32),
) -> Result<(), String> {
    let mut p = inv
        .read_postings_from_terminfo(term_info, IndexRecordOption::Basic)
        .map_err(err)?;
    let mut d = p.doc();
    while d != TERMINATED {
        f(d);
        d = p.advance();
    }
    Ok(())
}

/// A sink adding the concept of each document to `set`.
fn add_concepts<'a>(ords: &'a Column<u64>, set: &'a mut ConceptSet) -> impl FnMut(u32) + 'a {
    move |d| {
        if let Some(o) = ords.first(d) {
            set.insert(o as u32)
        }
    }
}

/// Documents holding the term `t`.
fn term_docs(inv: &InvertedIndexReader, t: &str, f: &mut impl FnMut(u32)) -> Result<(), String> {
    if let Some(ti) = inv.terms().get(t.as_bytes()).map_err(err)? {
        each_doc(inv, &ti, f)?;
    }
    Ok(())
}

/// Documents holding a term that starts with `prefix`.
fn prefix_docs(
    inv: &InvertedIndexReader,
    prefix: &str,
    f: &mut impl FnMut(u32),
) -> Result<(), String> {
    let mut terms = inv
        .terms()
        .range()
        .ge(prefix.as_bytes())
        .into_stream()
        .map_err(err)?;
    while terms.advance() {
        if !terms.key().starts_with(prefix.as_bytes()) {
            break;
        }
        each_doc(inv, terms.value(), f)?;
    }
    Ok(())
}

impl TextIndex {
    /// Builds the index for `table` in `dir` (replacing an existing one atomically).
    pub fn build(dir: &Path, table: &ConceptTable) -> Result<TextIndex, String> {
        let parent = dir.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(parent).map_err(err)?;
        let name = dir
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_else(|| "index".into());
        let tmp = parent.join(format!(".tmp-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).map_err(err)?;
        let result = (|| -> Result<(), String> {
            let schema = schema();
            let f = |n: &str| schema.get_field(n).map_err(err);
            let (ord, code, text, first, lead, word) = (
                f("ord")?,
                f("code")?,
                f("text")?,
                f("first")?,
                f("lead")?,
                f("word")?,
            );
            let index = Index::create_in_dir(&tmp, schema.clone()).map_err(err)?;
            let mut writer: IndexWriter =
                index.writer_with_num_threads(1, 200_000_000).map_err(err)?;
            let mut texts: Vec<&str> = Vec::new();
            for (i, c) in table.concepts.iter().enumerate() {
                texts.clear();
                for t in c
                    .display
                    .as_deref()
                    .into_iter()
                    .chain(c.designations.iter().map(|d| d.value.as_str()))
                {
                    if !texts.contains(&t) {
                        texts.push(t);
                    }
                }
                let code_lc = c.code.to_lowercase();
                if texts.is_empty() {
                    let mut d = TantivyDocument::new();
                    d.add_u64(ord, i as u64);
                    d.add_text(code, key(&code_lc));
                    writer.add_document(d).map_err(err)?;
                }
                for (k, t) in texts.iter().enumerate() {
                    let mut d = TantivyDocument::new();
                    d.add_u64(ord, i as u64);
                    if k == 0 {
                        d.add_text(code, key(&code_lc));
                    }
                    d.add_text(text, key(&t.to_lowercase()));
                    let ws = words(t);
                    if let Some(w) = ws.first() {
                        d.add_text(first, key(w));
                        // the text starts with its first word: a one-word query is a prefix
                        // of the text iff it is a prefix of this word
                        if t.starts_with(char::is_alphanumeric) {
                            d.add_text(lead, key(w));
                        }
                    }
                    for w in &ws {
                        d.add_text(word, key(w));
                    }
                    writer.add_document(d).map_err(err)?;
                }
            }
            let payload = serde_json::to_string(&Payload {
                format: FORMAT,
                concepts: table.concepts.len() as u64,
            })
            .map_err(err)?;
            let mut commit = writer.prepare_commit().map_err(err)?;
            commit.set_payload(&payload);
            commit.commit().map_err(err)?;
            // one segment: fewer term dictionaries to walk per query
            let ids = index.searchable_segment_ids().map_err(err)?;
            if ids.len() > 1 {
                writer.merge(&ids).wait().map_err(err)?;
            }
            writer.wait_merging_threads().map_err(err)?;
            Ok(())
        })();
        if let Err(e) = result {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e);
        }
        // swap into place: old → .old, tmp → dir, remove .old
        let old: PathBuf = parent.join(format!(".old-{name}-{}", std::process::id()));
        if dir.exists() {
            std::fs::rename(dir, &old).map_err(err)?;
        }
        if let Err(e) = std::fs::rename(&tmp, dir) {
            if old.exists() {
                let _ = std::fs::rename(&old, dir);
            }
            return Err(err(e));
        }
        let _ = std::fs::remove_dir_all(&old);
        TextIndex::open(dir)
    }

    /// Opens an index built by `build`; an index of another format is an error (rebuild it).
    pub fn open(dir: &Path) -> Result<TextIndex, String> {
        let index = Index::open_in_dir(dir).map_err(err)?;
        let payload: Option<Payload> = index
            .load_metas()
            .map_err(err)?
            .payload
            .and_then(|p| serde_json::from_str(&p).ok());
        let concepts = match payload {
            Some(p) if p.format == FORMAT => p.concepts,
            _ => {
                return Err(err(format!(
                    "{} was built by another version (format {FORMAT} expected)",
                    dir.display()
                )))
            }
        };
        let s = index.schema();
        let f = |n: &str| s.get_field(n).map_err(err);
        let fields = Fields {
            code: f("code")?,
            text: f("text")?,
            first: f("first")?,
            lead: f("lead")?,
            word: f("word")?,
        };
        f("ord")?;
        let reader = index.reader().map_err(err)?;
        Ok(TextIndex {
            reader,
            fields,
            concepts,
        })
    }

    /// Number of indexed concepts.
    pub fn len(&self) -> u64 {
        self.concepts
    }

    pub fn is_empty(&self) -> bool {
        self.concepts == 0
    }

    /// The six match tiers of `query` (see the module documentation), as sets of concept
    /// positions; `None` when the query is empty or too long to be answered exactly.
    pub fn tiers(&self, query: &str) -> Result<Option<[ConceptSet; 6]>, String> {
        let m = TextMatcher::new(query);
        let q = m.text();
        let ws = m.words();
        if q.is_empty() || q.len() >= KEY_LIMIT || ws.iter().any(|w| w.len() >= KEY_LIMIT) {
            return Ok(None);
        }
        let n = self.concepts as usize;
        let mut tiers: [ConceptSet; 6] = std::array::from_fn(|_| ConceptSet::new(n));
        let searcher = self.reader.searcher();
        for seg in searcher.segment_readers() {
            let ords: Column<u64> = seg.fast_fields().u64("ord").map_err(err)?;
            let code = seg.inverted_index(self.fields.code).map_err(err)?;
            let text = seg.inverted_index(self.fields.text).map_err(err)?;
            let [t100, t90, t80, t60, t50, t40] = &mut tiers;
            term_docs(&code, q, &mut add_concepts(&ords, t100))?;
            term_docs(&text, q, &mut add_concepts(&ords, t90))?;
            if ws.len() == 1 && ws[0] == q {
                // a one-word query: walking the (few) leading words instead of every text
                // that starts with the query
                let lead = seg.inverted_index(self.fields.lead).map_err(err)?;
                prefix_docs(&lead, q, &mut add_concepts(&ords, t80))?;
            } else {
                prefix_docs(&text, q, &mut add_concepts(&ords, t80))?;
            }
            prefix_docs(&code, q, &mut add_concepts(&ords, t40))?;
            if ws.is_empty() {
                continue;
            }
            let word = seg.inverted_index(self.fields.word).map_err(err)?;
            let first = seg.inverted_index(self.fields.first).map_err(err)?;
            if ws.len() == 1 {
                prefix_docs(&word, &ws[0], &mut add_concepts(&ords, t50))?;
                prefix_docs(&first, &ws[0], &mut add_concepts(&ords, t60))?;
                continue;
            }
            // several words: documents (texts) holding all of them
            let max = seg.max_doc() as usize;
            let mut all: Option<ConceptSet> = None;
            for w in ws {
                let mut docs = ConceptSet::new(max);
                prefix_docs(&word, w, &mut |d| docs.insert(d))?;
                match &mut all {
                    None => all = Some(docs),
                    Some(a) => a.intersect_with(&docs),
                }
            }
            let all = all.unwrap_or_default();
            let mut firsts = ConceptSet::new(max);
            prefix_docs(&first, &ws[0], &mut |d| firsts.insert(d))?;
            firsts.intersect_with(&all);
            let mut i50 = add_concepts(&ords, t50);
            all.iter().for_each(&mut i50);
            let mut i60 = add_concepts(&ords, t60);
            firsts.iter().for_each(&mut i60);
        }
        Ok(Some(tiers))
    }

    /// The ranked page and the number of matches of `query` (see `TextSearcher::ranked`).
    pub fn ranked_page(
        &self,
        query: &str,
        within: Option<&ConceptSet>,
        offset: usize,
        count: usize,
    ) -> Result<Option<(Vec<u32>, usize)>, String> {
        Ok(self
            .tiers(query)?
            .map(|tiers| rank_tiers(&tiers, within, offset, count)))
    }
}

impl TextSearcher for TextIndex {
    fn ranked(
        &self,
        query: &str,
        within: Option<&ConceptSet>,
        offset: usize,
        count: usize,
    ) -> Option<(Vec<u32>, usize)> {
        self.ranked_page(query, within, offset, count)
            .ok()
            .flatten()
    }

    fn tiers(&self, query: &str) -> Option<Vec<ConceptSet>> {
        TextIndex::tiers(self, query).ok().flatten().map(Vec::from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provider::{CodeSystemProvider, Concept, Designation};
    use std::sync::Arc;

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("kiln-tx-index-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    fn tier_members(idx: &TextIndex, q: &str) -> Vec<Vec<u32>> {
        idx.tiers(q)
            .unwrap()
            .unwrap()
            .iter()
            .map(|t| t.iter().collect())
            .collect()
    }

    #[test]
    fn prefix_per_word_and_ranking() {
        let mut t = ConceptTable::new("http://example.org/cs", None);
        t.add(Concept::new(
            "E11.9",
            Some("Type 2 diabetes mellitus without complications".into()),
        ));
        t.add(Concept::new(
            "E10.9",
            Some("Type 1 diabetes mellitus without complications".into()),
        ));
        t.add(Concept::new(
            "R73.9",
            Some("Hyperglycemia, unspecified".into()),
        ));
        t.add(Concept::new("DIAB", Some("Diabète sucré".into())));
        let dir = temp_dir("basic");
        let idx = TextIndex::build(&dir, &t).unwrap();
        assert_eq!(idx.len(), 4);
        // tiers: exact code, text equal, text starts with, all words (first word first), all
        // words, code starts with
        assert_eq!(
            tier_members(&idx, "diab mell type 2"),
            vec![vec![], vec![], vec![], vec![], vec![0], vec![]]
        );
        assert_eq!(
            tier_members(&idx, "type 2"),
            vec![vec![], vec![], vec![0], vec![0], vec![0], vec![]]
        );
        assert_eq!(
            tier_members(&idx, "DIAB"),
            vec![vec![3], vec![], vec![3], vec![3], vec![0, 1, 3], vec![3]]
        );
        assert_eq!(
            tier_members(&idx, "e1"),
            vec![vec![], vec![], vec![], vec![], vec![], vec![0, 1]]
        );
        assert_eq!(
            tier_members(&idx, "diabète sucré"),
            vec![vec![], vec![3], vec![3], vec![3], vec![3], vec![]]
        );
        // accents are significant, as in the scan
        assert_eq!(
            idx.ranked_page("diabète", None, 0, 10).unwrap(),
            Some((vec![3], 1))
        );
        assert_eq!(
            idx.ranked_page("zzz", None, 0, 10).unwrap(),
            Some((vec![], 0))
        );
        assert_eq!(idx.ranked_page("  ", None, 0, 10).unwrap(), None);
        // attached to the table it answers search with the scan's ranking
        let queries = [
            "diab",
            "diab mell type 2",
            "E10.9",
            "type",
            "hyp",
            "e1",
            "diabète",
        ];
        let scan: Vec<(Vec<String>, usize)> = queries
            .iter()
            .map(|q| t.search_page(q, false, 0, 10))
            .collect();
        t.set_text_index(Arc::new(idx));
        assert!(t.has_text_index());
        for (q, expected) in queries.iter().zip(scan) {
            assert_eq!(t.search_page(q, false, 0, 10), expected, "query {q}");
        }
        let r = t.search("diab", 10);
        assert_eq!(
            r,
            vec!["DIAB", "E11.9", "E10.9"],
            "exact code first, then word matches"
        );
        // rebuild replaces atomically and reopens
        let idx2 = TextIndex::build(&dir, &t).unwrap();
        assert_eq!(idx2.len(), 4);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Pseudo-random content (mixed case, punctuation, accents, designations, codes that look
    /// like words): the index answers every query with exactly the scan's page and total.
    #[test]
    fn ranks_and_counts_like_the_scan() {
        let vocab = [
            "Renal",
            "renal",
            "cardiac",
            "Chronic",
            "chr",
            "acute",
            "diabète",
            "Diabetes",
            "fracture",
            "left",
            "l'oreille",
            "X-ray",
            "Ödem",
            "odem",
            "2",
            "type",
            "Type",
            "RENAL",
            "cardio",
            "ré",
            "chronic-renal",
            "",
        ];
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = move |n: usize| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % n as u64) as usize
        };
        let mut t = ConceptTable::new("http://example.org/random", None);
        for i in 0..1500 {
            let phrase = |next: &mut dyn FnMut(usize) -> usize| {
                let n = 1 + next(4);
                let sep = [" ", ", ", " - ", "/"][next(4)];
                (0..n)
                    .map(|_| vocab[next(vocab.len())])
                    .collect::<Vec<_>>()
                    .join(sep)
            };
            let code = match next(10) {
                0 => vocab[next(vocab.len())].to_string(),
                1 => format!("CHR{i}"),
                _ => format!("C{i}"),
            };
            let display = (next(8) != 0).then(|| phrase(&mut next));
            let mut c = Concept::new(code, display);
            c.inactive = next(7) == 0;
            for _ in 0..next(4) {
                c.designations.push(Designation {
                    value: phrase(&mut next),
                    ..Default::default()
                });
            }
            t.add(c);
        }
        let dir = temp_dir("random");
        let idx = TextIndex::build(&dir, &t).unwrap();
        let mut indexed = t.clone();
        indexed.set_text_index(Arc::new(TextIndex::open(&dir).unwrap()));
        let mut queries: Vec<String> = [
            "renal",
            "ren",
            "RE",
            "r",
            "chr",
            "chronic renal",
            "chronic-renal",
            "renal chronic",
            "diab",
            "diabète",
            "DIABÈTE type",
            "ödem",
            "öd",
            "od",
            "x-ray",
            "x",
            "l'o",
            "oreille",
            "2",
            "type 2",
            "c1",
            "C10",
            "chr1",
            "cardiac, renal",
            "renal/",
            "zzz",
            "é",
            "ré",
            "acute left fracture",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        for _ in 0..20 {
            let c = &t.concepts[next(t.concepts.len())];
            let src = c.display.clone().unwrap_or_else(|| c.code.clone());
            let cut = src
                .char_indices()
                .map(|(i, _)| i)
                .nth(1 + next(8))
                .unwrap_or(src.len());
            queries.push(src[..cut].to_string());
            queries.push(src.clone());
        }
        for q in &queries {
            if q.trim().is_empty() {
                continue;
            }
            let full = t.search_page(q, false, 0, usize::MAX);
            for (offset, count) in [(0, usize::MAX), (7, 5), (60, 25)] {
                let expected = t.search_page(q, false, offset, count);
                assert_eq!(
                    indexed.search_page(q, false, offset, count),
                    expected,
                    "{q:?} {offset} {count}"
                );
                assert_eq!(expected.1, full.1);
                let expected = t.search_page(q, true, offset, count);
                assert_eq!(
                    indexed.search_page(q, true, offset, count),
                    expected,
                    "{q:?} active only, {offset} {count}"
                );
            }
        }
        // restricted to a subset: the scan's ranking filtered to the subset
        let within: ConceptSet = (0..t.len() as u32).filter(|i| i % 3 != 0).collect();
        for q in ["ren", "chronic renal", "c1", "diab"] {
            let full = t.search_page(q, false, 0, usize::MAX).0;
            let expected: Vec<u32> = full
                .iter()
                .map(|c| t.index_of(c).unwrap())
                .filter(|i| within.contains(*i))
                .collect();
            let (page, total) = idx
                .ranked_page(q, Some(&within), 0, usize::MAX)
                .unwrap()
                .unwrap();
            assert_eq!(total, expected.len(), "{q}");
            assert_eq!(page, expected, "{q}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// `$expand?filter=` of an is-a value set (`?fhir_vs=isa/…`, a compose `is-a` or
    /// `descendent-of` filter) over a large indexed system: the index's tiers intersected with
    /// the hierarchy give the general path's page and total, and the scan's ranking restricted
    /// to the value set's members.
    #[test]
    fn filtered_expand_of_is_a_value_set_equals_the_general_path() {
        let vocab = [
            "renal", "Chronic", "acute", "diabetes", "fracture", "left", "cardiac", "type",
        ];
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move |n: usize| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % n as u64) as usize
        };
        let url = "http://example.org/large-dag";
        let mut t = ConceptTable::new(url, None);
        let n = 3000;
        for i in 0..n {
            let words: Vec<&str> = (0..1 + next(3)).map(|_| vocab[next(vocab.len())]).collect();
            let mut c = Concept::new(format!("C{i}"), Some(words.join(" ")));
            c.inactive = next(9) == 0;
            if next(3) == 0 {
                c.designations.push(Designation {
                    value: vocab[next(vocab.len())].to_string(),
                    ..Default::default()
                });
            }
            t.add(c);
        }
        // a DAG: 1-2 parents among the earlier concepts (C0 is the root)
        for i in 1..n {
            let mut ps = vec![next(i)];
            if i > 10 && next(2) == 0 {
                ps.push(next(i));
            }
            ps.sort_unstable();
            ps.dedup();
            for p in ps {
                t.concepts[i].parents.push(p as u32);
                t.concepts[p].children.push(i as u32);
            }
        }
        t.reindex();
        let dir = temp_dir("isa");
        let idx = TextIndex::build(&dir, &t).unwrap();
        let mut indexed = t.clone();
        indexed.set_text_index(Arc::new(idx));
        let indexed = Arc::new(indexed);
        let mut tx = crate::Terminology::new();
        tx.add_code_system(indexed.clone());
        let page = |v: &serde_json::Value| -> (Vec<String>, u64) {
            let codes = v["expansion"]["contains"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .map(|c| c["code"].as_str().unwrap().to_string())
                        .collect()
                })
                .unwrap_or_default();
            (codes, v["expansion"]["total"].as_u64().unwrap())
        };
        let mut checked = 0;
        for root in ["C0", "C1", "C7", "C40", "C333"] {
            for (op, include_self) in [("is-a", true), ("descendent-of", false)] {
                let ri = t.index_of(root).unwrap();
                let members: ConceptSet = t
                    .filter_indexes("concept", op, root)
                    .unwrap()
                    .into_iter()
                    .collect();
                assert_eq!(members.contains(ri), include_self);
                for q in ["ren", "chronic", "c1", "diab type", "acute left", "zzz"] {
                    for active_only in [false, true] {
                        // the scan's ranking, restricted to the members (the oracle)
                        let scan: Vec<String> = t
                            .search_page(q, active_only, 0, usize::MAX)
                            .0
                            .into_iter()
                            .filter(|c| members.contains(t.index_of(c).unwrap()))
                            .collect();
                        for (offset, count) in [(0, 10), (5, 7), (40, 25)] {
                            let common = |mut p: Vec<serde_json::Value>| {
                                p.push(serde_json::json!({"name": "filter", "valueString": q}));
                                p.push(
                                    serde_json::json!({"name": "offset", "valueInteger": offset}),
                                );
                                p.push(serde_json::json!({"name": "count", "valueInteger": count}));
                                p.push(serde_json::json!({"name": "activeOnly", "valueBoolean": active_only}));
                                serde_json::json!({"resourceType": "Parameters", "parameter": p})
                            };
                            let include = serde_json::json!({"system": url, "filter": [
                                {"property": "concept", "op": op, "value": root}]});
                            // the fast path: one include with the filter
                            let fast = tx
                                .expand(&common(vec![
                                    serde_json::json!({"name": "valueSet", "resource": {
                                    "resourceType": "ValueSet", "id": "fast", "status": "active",
                                    "compose": {"include": [include.clone()]}}}),
                                ]))
                                .unwrap();
                            // the general path: the same members, but an exclude (of a code
                            // that does not exist) keeps the value set off the fast path
                            let general = tx
                                .expand(&common(vec![
                                    serde_json::json!({"name": "valueSet", "resource": {
                                    "resourceType": "ValueSet", "id": "general", "status": "active",
                                    "compose": {"include": [include], "exclude": [
                                        {"system": url, "concept": [{"code": "no-such-code"}]}]}}}),
                                ]))
                                .unwrap();
                            let (fast_codes, fast_total) = page(&fast);
                            // the provider answers it from the index (not the general path)
                            assert_eq!(
                                indexed.search_page_filtered(
                                    q,
                                    &[("concept", op, root)],
                                    active_only,
                                    offset,
                                    count
                                ),
                                Some((fast_codes.clone(), fast_total as usize)),
                                "{root} {op} {q:?}"
                            );
                            assert_eq!(
                                (fast_codes.clone(), fast_total),
                                page(&general),
                                "{root} {op} {q:?} active {active_only} {offset}/{count}"
                            );
                            assert_eq!(fast_total as usize, scan.len(), "{root} {op} {q:?}");
                            let want: Vec<String> =
                                scan.iter().skip(offset).take(count).cloned().collect();
                            assert_eq!(fast_codes, want, "{root} {op} {q:?} {offset}/{count}");
                            if op == "is-a" {
                                // the implicit value set `?fhir_vs=isa/…` takes the same path
                                let implicit = tx
                                    .expand(&common(vec![serde_json::json!({"name": "url",
                                        "valueUri": format!("{url}?fhir_vs=isa/{root}")})]))
                                    .unwrap();
                                assert_eq!(page(&implicit), (fast_codes, fast_total));
                            }
                            checked += 1;
                        }
                    }
                }
            }
        }
        assert_eq!(checked, 5 * 2 * 6 * 2 * 3);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// An index without this format's payload (an older Kiln's) is not opened, so the server
    /// rebuilds it.
    #[test]
    fn older_format_is_rejected() {
        let dir = temp_dir("old");
        std::fs::create_dir_all(&dir).unwrap();
        let index = Index::create_in_dir(&dir, schema()).unwrap();
        let mut w: IndexWriter = index.writer_with_num_threads(1, 15_000_000).unwrap();
        w.commit().unwrap();
        let e = TextIndex::open(&dir).unwrap_err();
        assert!(e.contains("another version"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
