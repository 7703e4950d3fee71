"""The referral exchange: matching a referred patient across members by pseudonym, fanning
signed prior-result queries out to every member, and the mutual-recognition (检查检验结果互认,
mark "HR") rules that decide whether a prior result replaces a new exam and what it saved."""
