//! The document and question of `kvq demo`: a fact planted in a long stretch of prose.

use crate::tokenizer::Tokenizer;

/// The fact `kvq demo` plants in its document.
pub const DEMO_FACT: &str = "A note pinned inside the Kellynch Hall library reads: the key to the old piano is kept in the blue teapot on the kitchen shelf.";
/// The question `kvq demo` asks about [`DEMO_FACT`].
pub const DEMO_QUESTION: &str = "Where is the key to the old piano kept?";
/// The word a right answer to [`DEMO_QUESTION`] holds.
pub const DEMO_ANSWER: &str = "teapot";

/// `kvq demo`'s document: whole paragraphs of `prose` from its start while they fit in `doc_tokens`
/// (counted with `tok`, two tokens per paragraph break), with [`DEMO_FACT`] before the paragraph that crosses
/// the halfway mark.
pub fn demo_document(tok: &Tokenizer, prose: &str, doc_tokens: usize) -> String {
    planted_document(tok, prose, 0, doc_tokens, &[(DEMO_FACT, doc_tokens / 2)]).0
}

/// Whole paragraphs of `prose`, from its `skip`-th on, while they fit in `doc_tokens` (counted with `tok`,
/// two tokens per paragraph break). Each `(text, mark)` of `facts`, in order, goes on a line of its own in
/// parentheses before the first paragraph that crosses `mark` tokens, at most one per paragraph. Returns
/// the document and how many facts it holds.
pub fn planted_document(
    tok: &Tokenizer,
    prose: &str,
    skip: usize,
    doc_tokens: usize,
    facts: &[(&str, usize)],
) -> (String, usize) {
    let mut doc = String::new();
    let mut used = 0;
    let mut planted = 0;
    for para in prose.split("\n\n").filter(|p| !p.trim().is_empty()).skip(skip) {
        let t = tok.encode(para, false, false).len() + 2;
        if used + t > doc_tokens {
            break;
        }
        if let Some((fact, mark)) = facts.get(planted)
            && used + t > *mark
        {
            doc.push_str(&format!("\n({fact})\n\n"));
            planted += 1;
        }
        doc.push_str(para.trim_matches('\n'));
        doc.push_str("\n\n");
        used += t;
    }
    (doc, planted)
}
