"""report.html: findings as tables a person reads, settings that apply, how the run was made and how to use it."""

from ppl_models.report import write_report

SUMMARY = dict(model="mixture", guide="enum", dataset="mnist", binarize="threshold", epochs=1, train_digits=500,
               seconds_per_epoch=0.1, units="nats", final_digits={"test": 100}, final={"test": {"exact": -100.0}})


def test_nested_findings_are_tables_keyed_by_their_rows(tmp_path):
    findings = {"cluster_purity_test": 0.5, "detection": {
        "roc_auc": 0.75, "digits": {"natural": 300, "spliced": 200}, "mean_log_p": {"natural": -90.0, "spliced": -95.5},
        "batch_test": {"by_batch_size": {"1": {"threshold": -100.0, "false_alarm": 0.05, "power": 0.25},
                                         "10": {"threshold": -96.0, "false_alarm": 0.04, "power": 0.875}}}}}
    write_report(tmp_path, {}, {**SUMMARY, **findings}, [])
    page = (tmp_path / "report.html").read_text()
    assert "detection / " not in page  # no flattened paths
    assert "<h3>Detection</h3>" in page and "<h4>Batch test</h4>" in page
    assert "<tr><td>cluster purity test</td><td>0.5</td></tr>" in page
    assert ("<tr><th>batch size</th><th>threshold</th><th>false alarm</th><th>power</th></tr>"
            "<tr><td>1</td><td>-100</td><td>0.05</td><td>0.25</td></tr>"
            "<tr><td>10</td><td>-96</td><td>0.04</td><td>0.875</td></tr>") in page
    assert ("<tr><th></th><th>digits</th><th>mean log p</th></tr><tr><td>natural</td><td>300</td><td>-90</td></tr>"
            "<tr><td>spliced</td><td>200</td><td>-95.5</td></tr>") in page
