//! Converts FHIR JSON to FHIR XML.
//!
//! `cargo run -p kiln-fhir --example to_xml -- file.json` prints one resource;
//! `cargo run -p kiln-fhir --example to_xml -- in_dir out_dir` converts every `*.json` in a
//! directory (for checking the output with other XML tools).
use std::path::Path;

fn convert(path: &Path) -> Result<String, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let value: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    kiln_fhir::json_to_xml(&value, true).map_err(|e| format!("{}: {e}", path.display()))
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.as_slice() {
        [file] => match convert(Path::new(file)) {
            Ok(x) => print!("{x}"),
            Err(e) => {
                eprintln!("{e}");
                std::process::exit(1);
            }
        },
        [input, output] => {
            let Ok(entries) = std::fs::read_dir(input) else {
                eprintln!("cannot read {input}");
                std::process::exit(1);
            };
            let (mut ok, mut failed) = (0, 0);
            for e in entries.filter_map(|e| e.ok()) {
                let p = e.path();
                if p.extension().is_none_or(|x| x != "json") {
                    continue;
                }
                match convert(&p) {
                    Ok(x) => {
                        let out = Path::new(output)
                            .join(p.with_extension("xml").file_name().unwrap_or_default());
                        if std::fs::write(&out, x).is_ok() {
                            ok += 1;
                        }
                    }
                    Err(_) => failed += 1,
                }
            }
            println!("{ok} converted, {failed} not convertible");
        }
        _ => {
            eprintln!("usage: to_xml <resource.json> | to_xml <in_dir> <out_dir>");
            std::process::exit(2);
        }
    }
}
