"""Training data: the Fill50K-format data set (`dataset`), its generator (`fill50k`) and the resumable order in
which training visits it (`data_order`)."""
