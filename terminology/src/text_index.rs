//! Full-text index of a code system's displays and designations (tantivy), for
//! `$expand?filter=` over large systems. Every word of the query is a prefix (type-ahead, as
//! Ontoserver does), and the exact code matches too; the index only finds the candidates, which
//! `ConceptTable::search` then ranks exact code > display starts with the text > all words match
//! (`provider::TextMatcher`), exactly as its scan would. Building is atomic: the index is written
//! to a temporary directory and renamed into place, so a failed build leaves the previous index.

use std::path::{Path, PathBuf};

use tantivy::collector::{Collector, SegmentCollector};
use tantivy::columnar::Column;
use tantivy::query::{BooleanQuery, Occur, Query, RegexQuery, TermQuery};
use tantivy::schema::{
    Field, IndexRecordOption, Schema, TextFieldIndexing, TextOptions, FAST, STORED, STRING,
};
use tantivy::tokenizer::{
    AsciiFoldingFilter, LowerCaser, RemoveLongFilter, SimpleTokenizer, TextAnalyzer,
};
use tantivy::{doc, DocId, Index, IndexReader, IndexWriter, Score, SegmentReader, Term};

use crate::provider::{ConceptTable, TextSearcher};

const TOKENIZER: &str = "kiln_text";

/// A text index over one `ConceptTable`.
pub struct TextIndex {
    index: Index,
    reader: IndexReader,
    code: Field,
    text: Field,
    docs: u64,
}

impl std::fmt::Debug for TextIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextIndex")
            .field("docs", &self.docs)
            .finish()
    }
}

fn err(e: impl std::fmt::Display) -> String {
    format!("text index: {e}")
}

fn schema() -> (Schema, Field, Field, Field) {
    let mut b = Schema::builder();
    // the concept's position in the table: a fast field, read per matching document
    let ord = b.add_u64_field("ord", FAST | STORED);
    let code = b.add_text_field("code", STRING);
    let text_opts = TextOptions::default().set_indexing_options(
        TextFieldIndexing::default()
            .set_tokenizer(TOKENIZER)
            .set_index_option(IndexRecordOption::Basic),
    );
    let text = b.add_text_field("text", text_opts);
    (b.build(), ord, code, text)
}

fn analyzer() -> TextAnalyzer {
    TextAnalyzer::builder(SimpleTokenizer::default())
        .filter(RemoveLongFilter::limit(60))
        .filter(LowerCaser)
        .filter(AsciiFoldingFilter)
        .build()
}

/// Collects the `ord` fast field of every matching document.
struct OrdCollector;

struct OrdSegment {
    column: Column<u64>,
    out: Vec<u32>,
}

impl Collector for OrdCollector {
    type Fruit = Vec<u32>;
    type Child = OrdSegment;

    fn for_segment(
        &self,
        _segment_local_id: u32,
        segment: &SegmentReader,
    ) -> tantivy::Result<OrdSegment> {
        Ok(OrdSegment {
            column: segment.fast_fields().u64("ord")?,
            out: Vec::new(),
        })
    }

    fn requires_scoring(&self) -> bool {
        false
    }

    fn merge_fruits(&self, fruits: Vec<Vec<u32>>) -> tantivy::Result<Vec<u32>> {
        Ok(fruits.into_iter().flatten().collect())
    }
}

impl SegmentCollector for OrdSegment {
    type Fruit = Vec<u32>;

    fn collect(&mut self, doc: DocId, _score: Score) {
        if let Some(o) = self.column.first(doc) {
            self.out.push(o as u32);
        }
    }

    fn harvest(self) -> Vec<u32> {
        self.out
    }
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
            let (schema, ord, code, text) = schema();
            let index = Index::create_in_dir(&tmp, schema).map_err(err)?;
            index.tokenizers().register(TOKENIZER, analyzer());
            let mut writer: IndexWriter =
                index.writer_with_num_threads(1, 200_000_000).map_err(err)?;
            for (i, c) in table.concepts.iter().enumerate() {
                let mut t = String::new();
                if let Some(d) = &c.display {
                    t.push_str(d);
                }
                for d in &c.designations {
                    t.push_str(" | ");
                    t.push_str(&d.value);
                }
                writer
                    .add_document(doc!(ord => i as u64, code => c.code.clone(), text => t))
                    .map_err(err)?;
            }
            writer.commit().map_err(err)?;
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

    /// Opens an index built by `build`.
    pub fn open(dir: &Path) -> Result<TextIndex, String> {
        let index = Index::open_in_dir(dir).map_err(err)?;
        index.tokenizers().register(TOKENIZER, analyzer());
        let s = index.schema();
        let code = s.get_field("code").map_err(err)?;
        let text = s.get_field("text").map_err(err)?;
        let reader = index.reader().map_err(err)?;
        let docs = reader.searcher().num_docs();
        Ok(TextIndex {
            index,
            reader,
            code,
            text,
            docs,
        })
    }

    /// Number of indexed concepts.
    pub fn len(&self) -> u64 {
        self.docs
    }

    pub fn is_empty(&self) -> bool {
        self.docs == 0
    }

    /// Positions (in the indexed table) of the concepts whose code is `query` or whose texts
    /// have a word starting with each word of `query` (after lowercasing and ASCII folding).
    pub fn matching_ords(&self, query: &str) -> Result<Vec<u32>, String> {
        let mut should: Vec<(Occur, Box<dyn Query>)> = vec![(
            Occur::Should,
            Box::new(TermQuery::new(
                Term::from_field_text(self.code, query.trim()),
                IndexRecordOption::Basic,
            )),
        )];
        let mut toks: Vec<String> = Vec::new();
        let mut a = analyzer();
        let mut ts = a.token_stream(query);
        while ts.advance() {
            toks.push(ts.token().text.clone());
        }
        if !toks.is_empty() {
            let mut must: Vec<Box<dyn Query>> = Vec::new();
            for t in &toks {
                let q = RegexQuery::from_pattern(&format!("{}.*", regex::escape(t)), self.text)
                    .map_err(err)?;
                must.push(Box::new(q));
            }
            should.push((Occur::Should, Box::new(BooleanQuery::intersection(must))));
        }
        let q = BooleanQuery::new(should);
        let searcher = self.reader.searcher();
        let _ = &self.index;
        searcher.search(&q, &OrdCollector).map_err(err)
    }
}

impl TextSearcher for TextIndex {
    fn matching(&self, query: &str) -> Option<Vec<u32>> {
        self.matching_ords(query).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provider::{CodeSystemProvider, Concept};
    use std::sync::Arc;

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
        let dir = std::env::temp_dir().join(format!("kiln-tx-index-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let idx = TextIndex::build(&dir, &t).unwrap();
        assert_eq!(idx.len(), 4);
        // the index finds candidates: every word a prefix, accents folded
        let mut m = idx.matching_ords("diab mell type 2").unwrap();
        m.sort();
        assert_eq!(m, vec![0]);
        // "diabète" folds to "diabete", a prefix of "diabetes" too
        let mut m = idx.matching_ords("diabète").unwrap();
        m.sort();
        assert_eq!(m, vec![0, 1, 3]);
        let mut m = idx.matching_ords("DIABETE SUCR").unwrap();
        m.sort();
        assert_eq!(m, vec![3]);
        assert_eq!(idx.matching_ords("E10.9").unwrap(), vec![1]);
        assert!(idx.matching_ords("zzz").unwrap().is_empty());
        // attached to the table it answers search with the scan's ranking
        let scan: Vec<Vec<String>> = ["diab", "diab mell type 2", "E10.9", "type", "hyp"]
            .iter()
            .map(|q| t.search(q, 10))
            .collect();
        t.set_text_index(Arc::new(idx));
        assert!(t.has_text_index());
        for (q, expected) in ["diab", "diab mell type 2", "E10.9", "type", "hyp"]
            .iter()
            .zip(scan)
        {
            assert_eq!(t.search(q, 10), expected, "query {q}");
        }
        let r = t.search("diab", 10);
        assert_eq!(r[0], "DIAB", "display starts with the text ranks first");
        assert!(r.contains(&"E10.9".to_string()));
        // rebuild replaces atomically and reopens
        let idx2 = TextIndex::build(&dir, &t).unwrap();
        assert_eq!(idx2.len(), 4);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
