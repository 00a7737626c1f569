"""Models users bring: ``load`` (Hub ids, folders, SD versions, identity, prompt encoding), ``tiny``
(the random-weight SD-2.1-layout test model, built in code), ``hf`` (Hugging Face library plumbing)."""
