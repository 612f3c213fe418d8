//! The failure classes every boundary error maps to (design §4), and so what the bus does with
//! a message that failed.

/// What kind of failure an error is, which decides the message's fate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ErrorClass {
    /// The message can never be processed as it is: dead-lettered at once.
    Invalid,
    /// Retrying later may succeed (a timeout, a 5xx, a full disk): retried, then dead-lettered
    /// as exhausted.
    Transient,
    /// The other side refused for good (a 4xx no idempotency rule turns into success):
    /// dead-lettered with the answer.
    Permanent,
}

impl ErrorClass {
    /// The lowercase name, as used in metrics labels and dead-letter headers.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::Invalid => "invalid",
            ErrorClass::Transient => "transient",
            ErrorClass::Permanent => "permanent",
        }
    }
}

impl std::fmt::Display for ErrorClass {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What became of a message, as metrics and logs name it: a closed set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Label {
    /// Its effects are done.
    Processed,
    /// Nothing to do for it.
    Ignored,
    /// It failed, in this class.
    Failed(ErrorClass),
}

impl Label {
    /// The label's text: `processed`, `ignored`, or the failure class.
    pub fn as_str(self) -> &'static str {
        match self {
            Label::Processed => "processed",
            Label::Ignored => "ignored",
            Label::Failed(class) => class.as_str(),
        }
    }
}

/// What one attempt at a message decides: done, worth another try, or never to succeed. The
/// bus turns it into acknowledge, retry or dead-letter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fate {
    /// Done (processed or ignored).
    Done(Label),
    /// Failed; trying again may succeed. The reason, with its causes.
    Retry(String),
    /// Failed for good, in this class (invalid or permanent). The reason, with its causes.
    DeadLetter(ErrorClass, String),
}

impl Fate {
    /// The fate of a failure of `class`, for `reason`.
    pub fn failed(class: ErrorClass, reason: String) -> Self {
        match class {
            ErrorClass::Transient => Fate::Retry(reason),
            class => Fate::DeadLetter(class, reason),
        }
    }
}

/// An error and its sources, joined with `: `.
pub fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        // thiserror messages often embed their source already.
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}
