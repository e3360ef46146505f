//! The evaluation texts come out of their Debian packages intact.

use kvq_host::eval::texts;

#[test]
fn download_austen_novels_come_out_of_the_r_database() {
    let pp = texts::text("prideprejudice", true).expect("fetch janeaustenr");
    let lines: Vec<&str> = pp.lines().collect();
    // janeaustenr 1.0.0 holds Pride and Prejudice as 13030 lines (one R string each, blank lines empty).
    assert_eq!(lines.len(), 13030);
    assert_eq!(lines[0], "PRIDE AND PREJUDICE");
    assert!(pp.contains("It is a truth universally acknowledged, that a single man in possession"));
    for (name, first) in [
        ("sensesensibility", "SENSE AND SENSIBILITY"),
        ("mansfieldpark", "MANSFIELD PARK"),
        ("emma", "EMMA"),
        ("northangerabbey", "NORTHANGER ABBEY"),
        ("persuasion", "Persuasion"),
    ] {
        let t = texts::text(name, true).unwrap();
        assert!(t.starts_with(first), "{name} starts {:?}", &t[..40.min(t.len())]);
        assert!(t.len() > 400_000, "{name}: {} bytes", t.len());
    }
}

#[test]
fn download_jargon_file_is_unpacked() {
    let j = texts::text("jargon", true).expect("fetch jargon-text");
    assert!(j.contains("hacker"), "no `hacker` in the Jargon File");
    assert!(j.len() > 1_000_000, "{} bytes", j.len());
}

#[test]
fn unknown_text_is_an_error() {
    let e = texts::text("ulysses", true).unwrap_err().to_string();
    assert!(e.contains("unknown text") && e.contains("prideprejudice"), "{e}");
}
