import ftplm


def test_tiny_runs_load_and_generate(tiny_ftp_run, tiny_gpt_run):
    for run in (tiny_ftp_run, tiny_gpt_run):
        model = ftplm.load(run)
        ids = model.generate_ids("The history of", max_new_tokens=5, temperature=0, stop_at_eos=False)
        assert len(ids) == 5
