//! What a failure is about, which picks the exit status: scripts can tell a
//! bad option from a broken model file or a full disk without parsing text.

/// A failure's kind, attached to an error as context ([`Tag::tag`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// An option or value on the command line (2, as clap's own errors).
    Usage,
    /// An input file: image, mask, prompt file, PNG to replay.
    Input,
    /// A model, LoRA, VAE or embedding file.
    Model,
    /// The device, or not enough memory.
    Device,
    /// Writing the output.
    Output,
}

impl Failure {
    /// The exit status (1 is any other failure, 130 an interrupted batch).
    pub fn code(self) -> u8 {
        match self {
            Failure::Usage => 2,
            Failure::Input => 3,
            Failure::Model => 4,
            Failure::Device => 5,
            Failure::Output => 6,
        }
    }

    /// The kind attached to `error`, the innermost when there are several.
    pub fn of(error: &anyhow::Error) -> Option<Self> {
        error.downcast_ref::<Failure>().copied()
    }
}

/// An error chain on one line: each cause's first line (candle appends
/// backtraces), joined by `: `.
pub fn one_line(error: &anyhow::Error) -> String {
    let causes: Vec<String> = error
        .chain()
        .map(|c| c.to_string().lines().next().unwrap_or_default().trim().to_string())
        .filter(|c| !c.is_empty())
        .collect();
    causes.join(": ")
}

/// Shown as nothing: the kind is a marker, not part of the message.
impl std::fmt::Display for Failure {
    fn fmt(&self, _: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        Ok(())
    }
}

/// Attaches a [`Failure`] kind to an error that has none yet.
pub trait Tag<T> {
    fn tag(self, kind: Failure) -> anyhow::Result<T>;
}

impl<T> Tag<T> for anyhow::Result<T> {
    fn tag(self, kind: Failure) -> anyhow::Result<T> {
        self.map_err(|e| if Failure::of(&e).is_some() { e } else { e.context(kind) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_kind_attached_wins() {
        let e: anyhow::Result<()> = Err(anyhow::anyhow!("x.png: not an image"));
        let e = e.tag(Failure::Input).tag(Failure::Output).unwrap_err();
        assert_eq!(Failure::of(&e), Some(Failure::Input));
        let text: Vec<String> = e.chain().map(|c| c.to_string()).filter(|s| !s.is_empty()).collect();
        assert_eq!(text, ["x.png: not an image"]);
    }
}
