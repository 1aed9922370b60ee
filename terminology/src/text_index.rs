//! Full-text index of a code system's displays and designations (tantivy), for
//! `$expand?filter=` over large systems. Every word of the query is a prefix (type-ahead, as
//! Ontoserver does); candidates are re-ranked exact code > display starts with the text > all
//! words match (see `provider::match_score`). Building is atomic: the index is written to a
//! temporary directory and renamed into place, so a failed build leaves the previous index.

use std::path::{Path, PathBuf};

use tantivy::collector::TopDocs;
use tantivy::query::{BooleanQuery, Occur, Query, RegexQuery, TermQuery};
use tantivy::schema::{
    Field, IndexRecordOption, Schema, TextFieldIndexing, TextOptions, Value, STORED, STRING,
};
use tantivy::tokenizer::{
    AsciiFoldingFilter, LowerCaser, RemoveLongFilter, SimpleTokenizer, TextAnalyzer,
};
use tantivy::{doc, Index, IndexReader, IndexWriter, TantivyDocument, Term};

use crate::provider::{match_score, words, ConceptTable};

const TOKENIZER: &str = "kiln_text";
/// Candidates fetched from the index before re-ranking.
const CANDIDATES: usize = 500;

/// A text index over one `ConceptTable`.
pub struct TextIndex {
    index: Index,
    reader: IndexReader,
    ord: Field,
    code: Field,
    text: Field,
}

fn err(e: impl std::fmt::Display) -> String {
    format!("text index: {e}")
}

fn schema() -> (Schema, Field, Field, Field) {
    let mut b = Schema::builder();
    let ord = b.add_u64_field("ord", STORED);
    let code = b.add_text_field("code", STRING);
    let text_opts = TextOptions::default().set_indexing_options(
        TextFieldIndexing::default()
            .set_tokenizer(TOKENIZER)
            .set_index_option(IndexRecordOption::WithFreqsAndPositions),
    );
    let text = b.add_text_field("text", text_opts);
    (b.build(), ord, code, text)
}

fn register(index: &Index) {
    let analyzer = TextAnalyzer::builder(SimpleTokenizer::default())
        .filter(RemoveLongFilter::limit(60))
        .filter(LowerCaser)
        .filter(AsciiFoldingFilter)
        .build();
    index.tokenizers().register(TOKENIZER, analyzer);
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
            register(&index);
            let mut writer: IndexWriter =
                index.writer_with_num_threads(1, 100_000_000).map_err(err)?;
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
        register(&index);
        let s = index.schema();
        let ord = s.get_field("ord").map_err(err)?;
        let code = s.get_field("code").map_err(err)?;
        let text = s.get_field("text").map_err(err)?;
        let reader = index.reader().map_err(err)?;
        Ok(TextIndex {
            index,
            reader,
            ord,
            code,
            text,
        })
    }

    /// Number of indexed concepts.
    pub fn len(&self) -> u64 {
        self.reader.searcher().num_docs()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Codes matching `query` (every word a prefix, or the exact code), best first.
    pub fn search(
        &self,
        table: &ConceptTable,
        query: &str,
        limit: usize,
    ) -> Result<Vec<String>, String> {
        let toks = words(query);
        let mut should: Vec<(Occur, Box<dyn Query>)> = vec![(
            Occur::Should,
            Box::new(TermQuery::new(
                Term::from_field_text(self.code, query.trim()),
                IndexRecordOption::Basic,
            )),
        )];
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
        let top = searcher
            .search(&q, &TopDocs::with_limit(CANDIDATES))
            .map_err(err)?;
        let mut scored: Vec<(u32, usize)> = Vec::new();
        for (_, addr) in top {
            let d: TantivyDocument = searcher.doc(addr).map_err(err)?;
            let Some(i) = d.get_first(self.ord).and_then(|v| v.as_u64()) else {
                continue;
            };
            let Some(c) = table.concepts.get(i as usize) else {
                continue;
            };
            let mut texts: Vec<&str> = Vec::new();
            if let Some(d) = &c.display {
                texts.push(d);
            }
            for d in &c.designations {
                texts.push(&d.value);
            }
            let s = match_score(query, &c.code, &texts);
            if s > 0 {
                scored.push((s, i as usize));
            }
        }
        scored.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
        let _ = &self.index;
        Ok(scored
            .into_iter()
            .take(limit)
            .map(|(_, i)| table.concepts[i].code.clone())
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provider::Concept;

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
        let r = idx.search(&t, "diab mell type 2", 10).unwrap();
        assert_eq!(r, vec!["E11.9"]);
        let r = idx.search(&t, "diab", 10).unwrap();
        assert_eq!(r[0], "DIAB", "ascii folding + code prefix"); // "diabete" starts-with display
        assert!(r.contains(&"E10.9".to_string()));
        let r = idx.search(&t, "E10.9", 10).unwrap();
        assert_eq!(r[0], "E10.9");
        // rebuild replaces atomically and reopens
        let idx2 = TextIndex::build(&dir, &t).unwrap();
        assert_eq!(idx2.len(), 4);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
