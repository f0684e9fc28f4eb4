"""KPI functions of the charter on small hand-made frames with known answers."""

import numpy as np
import pandas as pd
import pytest

from lib.kpis import (
    measurable_campaigns,
    measure_kpi,
    measure_offer_precision,
    measure_redemption_rate,
    measure_store_visit_rate,
    measure_visit_uplift,
)


def campaigns_table(*rows):
    return pd.DataFrame([dict(campaign_id=c, start_date=pd.Timestamp(s), end_date=pd.Timestamp(e)) for c, s, e in rows])


def transactions(*rows):
    return pd.DataFrame(
        {"household_id": [h for h, _ in rows], "transaction_timestamp": pd.to_datetime([t for _, t in rows])}
    )


DESCS = campaigns_table((1, "2017-03-01", "2017-03-31"), (2, "2017-03-10", "2017-04-10"))
POPULATION = pd.DataFrame({"household_id": [1, 2, 3, 4, 5, 6]})


@pytest.mark.parametrize(
    "timestamp, visits",
    [("2017-03-01 00:00", 1), ("2017-03-15 23:59:59", 1), ("2017-03-16 00:00", 0), ("2017-02-28 23:59", 0)],
)
def test_visit_window_is_days_0_to_14_inclusive(timestamp, visits):
    targeted = pd.DataFrame({"campaign_id": [1], "household_id": [1]})
    result = measure_store_visit_rate(transactions((1, timestamp)), targeted, DESCS[DESCS.campaign_id == 1], POPULATION)
    assert result.by_campaign.messaged_visitors.tolist() == [visits]
    assert result.value == visits


def test_household_without_transactions_counts_as_not_visiting():
    targeted = pd.DataFrame({"campaign_id": [1, 1], "household_id": [1, 2]})  # household 2 never shops
    result = measure_store_visit_rate(
        transactions((1, "2017-03-02")), targeted, DESCS[DESCS.campaign_id == 1], POPULATION
    )
    assert result.value == 0.5
    row = result.by_campaign.iloc[0]
    assert (row.comparison, row.comparison_visitors) == (4, 0)


def test_overlapping_campaigns_are_measured_separately():
    targeted = pd.DataFrame({"campaign_id": [1, 2, 2], "household_id": [1, 1, 2]})
    tx = transactions((1, "2017-03-05"), (2, "2017-03-20"), (3, "2017-03-12"))
    result = measure_store_visit_rate(tx, targeted, DESCS, POPULATION).by_campaign.set_index("campaign_id")
    # campaign 1 (days 1-15 Mar): hh 1 visits; comparison hh 3 visits on day 11, hh 2 on day 19 is too late
    assert result.loc[1, ["messaged", "messaged_visitors", "comparison", "comparison_visitors"]].tolist() == [
        1,
        1,
        5,
        1,
    ]
    # campaign 2 (10-24 Mar): hh 2 visits, hh 1 does not (its visit was on 5 Mar); hh 3 is in the comparison group
    assert result.loc[2, ["messaged", "messaged_visitors", "comparison", "comparison_visitors"]].tolist() == [
        2,
        1,
        4,
        1,
    ]
    uplift = measure_visit_uplift(tx, targeted, DESCS, POPULATION)
    assert uplift.value == pytest.approx(2 / 3 - 2 / 9)


def test_kpi_with_nobody_messaged_is_an_error_not_nan():
    empty = pd.DataFrame({"campaign_id": pd.Series(dtype=int), "household_id": pd.Series(dtype=int)})
    with pytest.raises(ValueError, match="zero messaged"):
        measure_store_visit_rate(transactions((1, "2017-03-02")), empty, DESCS, POPULATION)


def test_redemptions_count_once_per_household_and_only_during_the_campaign():
    targeted = pd.DataFrame({"campaign_id": [1, 1, 1], "household_id": [1, 2, 3]})
    redemptions = pd.DataFrame(
        {
            "household_id": [1, 1, 2, 3],
            "coupon_upc": [10, 11, 10, 10],
            "campaign_id": [1, 1, 1, 2],
            "redemption_date": pd.to_datetime(["2017-03-02", "2017-03-03", "2017-04-01", "2017-03-12"]),
        }
    )
    result = measure_redemption_rate(targeted, DESCS, redemptions)
    assert result.by_campaign.set_index("campaign_id").redeemers.to_dict() == {1: 1}
    assert result.value == pytest.approx(1 / 3)


def test_offer_precision_matches_household_campaign_and_coupon():
    offers = pd.DataFrame({"household_id": [1, 1, 2], "campaign_id": [1, 1, 1], "coupon_upc": [10, 12, 10]})
    redemptions = pd.DataFrame(
        {
            "household_id": [1, 2],
            "coupon_upc": [10, 11],
            "campaign_id": [1, 1],
            "redemption_date": pd.to_datetime(["2017-03-05", "2017-03-06"]),
        }
    )
    assert measure_offer_precision(offers, DESCS, redemptions).value == pytest.approx(1 / 3)


def test_campaigns_outside_the_observed_period_are_not_measurable():
    descs = campaigns_table(
        (1, "2016-12-20", "2017-01-20"), (2, "2017-02-01", "2017-02-20"), (3, "2017-12-25", "2017-12-28")
    )
    assert measurable_campaigns(descs, "2017-01-01", "2017-12-31", 14).campaign_id.tolist() == [2]


def test_measure_kpi_passes_tables_by_parameter_name_and_kpi_params():
    kpi = {"id": "v", "function": "lib.kpis.measure_store_visit_rate", "params": {"window_days": 0}}
    tables = {
        "transactions": transactions((1, "2017-03-02")),
        "campaigns": pd.DataFrame({"campaign_id": [1], "household_id": [1]}),
        "campaign_descriptions": DESCS[DESCS.campaign_id == 1],
        "households": POPULATION,
    }
    assert measure_kpi(kpi, tables).value == 0.0  # a one-day window: the visit on day 1 is outside
    with pytest.raises(KeyError, match="needs table"):
        measure_kpi(kpi, {k: v for k, v in tables.items() if k != "households"})


def test_offer_precision_counts_each_distinct_offer_once_per_measured_campaign():
    rng = np.random.default_rng(7)
    offers = pd.DataFrame(  # repeats, and campaign 3, which DESCS does not measure
        {
            "household_id": rng.integers(1, 7, 300),
            "campaign_id": rng.integers(1, 4, 300),
            "coupon_upc": rng.integers(10, 14, 300),
        }
    )
    redemptions = pd.DataFrame(
        {
            "household_id": rng.integers(1, 7, 40),
            "coupon_upc": rng.integers(10, 14, 40),
            "campaign_id": rng.integers(1, 4, 40),
            "redemption_date": pd.Timestamp("2017-03-05") + pd.to_timedelta(rng.integers(0, 40, 40), unit="D"),
        }
    )
    measured = measure_offer_precision(offers, DESCS, redemptions).by_campaign.set_index("campaign_id")
    window = DESCS.set_index("campaign_id")
    for campaign_id in (1, 2):
        sent = {tuple(r) for r in offers[offers.campaign_id == campaign_id].to_numpy()}
        day = redemptions.redemption_date
        in_window = day.between(window.start_date[campaign_id], window.end_date[campaign_id])
        on_time = redemptions[(redemptions.campaign_id == campaign_id) & in_window]
        redeemed = {(h, c, u) for h, u, c in on_time[["household_id", "coupon_upc", "campaign_id"]].to_numpy()}
        assert measured.loc[campaign_id, ["offers", "redeemed"]].tolist() == [len(sent), len(sent & redeemed)]
    assert 3 not in measured.index
