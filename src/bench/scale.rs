//! Scale benchmark: CreateVolume latency with an empty driver vs with N
//! volumes, creation throughput, and ListVolumes paging through all of them.
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use clap::Args;
use serde::Serialize;

use super::report::{print_table, OpSummary, Samples};
use super::VolumeArgs;
use crate::client::{connect, CsiClient};
use crate::csi::v1 as csi;

#[derive(Debug, Clone, Args)]
pub struct ScaleArgs {
    /// Volumes to create in all.
    #[arg(long, default_value_t = 10_000)]
    pub volumes: usize,
    /// Creations in flight at once while filling up.
    #[arg(short = 'c', long, default_value_t = 16)]
    pub concurrency: usize,
    /// Volumes created one at a time at each end to measure latency.
    #[arg(long, default_value_t = 200)]
    pub sample: usize,
    /// ListVolumes max_entries.
    #[arg(long, default_value_t = 500)]
    pub page_size: i32,
    /// Leave the volumes in place (e.g. for `bench startup`).
    #[arg(long)]
    pub keep: bool,
    #[command(flatten)]
    pub volume: VolumeArgs,
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Serialize)]
pub struct ScaleReport {
    pub volumes: usize,
    pub create_empty: OpSummary,
    pub create_full: OpSummary,
    pub p50_ratio_full_to_empty: f64,
    pub fill_per_second: f64,
    pub list_pages: usize,
    pub list_entries: usize,
    pub list_total_ms: f64,
    pub list_page: OpSummary,
    pub delete_per_second: Option<f64>,
    /// Whether ListVolumes paged correctly: every volume created was
    /// listed, and no page was larger than asked.
    pub paging_ok: bool,
    pub list_missing: usize,
    pub list_overfull_pages: usize,
}

async fn create_one(
    c: &mut CsiClient,
    a: &ScaleArgs,
    name: String,
    topo: Option<&csi::Topology>,
) -> anyhow::Result<String> {
    let v = c
        .controller
        .create_volume(a.volume.create(name, topo))
        .await?
        .into_inner();
    v.volume
        .map(|v| v.volume_id)
        .ok_or_else(|| anyhow::anyhow!("no volume returned"))
}

pub async fn run(endpoint: &str, a: ScaleArgs) -> anyhow::Result<i32> {
    anyhow::ensure!(
        a.volumes >= 2 * a.sample,
        "--volumes must be at least twice --sample"
    );
    let mut c = connect(endpoint).await?;
    let topo = c
        .node
        .node_get_info(csi::NodeGetInfoRequest {})
        .await
        .ok()
        .and_then(|r| r.into_inner().accessible_topology);
    let run = super::run_id();
    let mut ids = Vec::with_capacity(a.volumes);
    let mut empty = Samples::default();
    for i in 0..a.sample {
        let t = Instant::now();
        ids.push(create_one(&mut c, &a, format!("{run}-{i}"), topo.as_ref()).await?);
        empty.add("CreateVolume (empty)", t.elapsed());
    }
    let fill_n = a.volumes - 2 * a.sample;
    let next = Arc::new(AtomicUsize::new(a.sample));
    let end = a.sample + fill_n;
    let t_fill = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..a.concurrency.max(1) {
        let (mut c, a, next, run, topo) = (
            c.clone(),
            a.clone(),
            next.clone(),
            run.clone(),
            topo.clone(),
        );
        workers.push(tokio::spawn(async move {
            let mut mine = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                if i >= end {
                    break;
                }
                mine.push(create_one(&mut c, &a, format!("{run}-{i}"), topo.as_ref()).await?);
            }
            Ok::<_, anyhow::Error>(mine)
        }));
    }
    for w in workers {
        ids.extend(w.await??);
    }
    let fill_per_second = fill_n as f64 / t_fill.elapsed().as_secs_f64().max(f64::EPSILON);
    let mut full = Samples::default();
    for i in end..a.volumes {
        let t = Instant::now();
        ids.push(create_one(&mut c, &a, format!("{run}-{i}"), topo.as_ref()).await?);
        full.add("CreateVolume (full)", t.elapsed());
    }
    // Page through everything.
    let mut pages = Samples::default();
    let mut token = String::new();
    let mut entries = 0;
    let mut n_pages = 0;
    let mut listed = std::collections::HashSet::new();
    let mut overfull = 0;
    let t_list = Instant::now();
    loop {
        let t = Instant::now();
        let r = c
            .controller
            .list_volumes(csi::ListVolumesRequest {
                max_entries: a.page_size,
                starting_token: token.clone(),
            })
            .await?
            .into_inner();
        pages.add("ListVolumes page", t.elapsed());
        n_pages += 1;
        entries += r.entries.len();
        if a.page_size > 0 && r.entries.len() > a.page_size as usize {
            overfull += 1;
        }
        listed.extend(
            r.entries
                .iter()
                .filter_map(|e| e.volume.as_ref().map(|v| v.volume_id.clone())),
        );
        if r.next_token.is_empty() {
            break;
        }
        token = r.next_token;
    }
    let list_total = t_list.elapsed();
    // Every volume created must be listed, no page may exceed max_entries
    // (a driver that never returns a next token hides all but a page).
    let missing = ids.iter().filter(|id| !listed.contains(*id)).count();
    let paging_ok = missing == 0 && overfull == 0;
    let mut delete_per_second = None;
    if !a.keep {
        let t = Instant::now();
        let ids = Arc::new(ids);
        let next = Arc::new(AtomicUsize::new(0));
        let mut workers = Vec::new();
        for _ in 0..a.concurrency.max(1) {
            let (mut c, ids, next) = (c.clone(), ids.clone(), next.clone());
            workers.push(tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    let Some(id) = ids.get(i) else { break };
                    c.controller
                        .delete_volume(csi::DeleteVolumeRequest {
                            volume_id: id.clone(),
                            ..Default::default()
                        })
                        .await?;
                }
                Ok::<_, anyhow::Error>(())
            }));
        }
        for w in workers {
            w.await??;
        }
        delete_per_second = Some(ids.len() as f64 / t.elapsed().as_secs_f64().max(f64::EPSILON));
    }
    let ce = empty.summary().remove(0);
    let cf = full.summary().remove(0);
    let report = ScaleReport {
        volumes: a.volumes,
        p50_ratio_full_to_empty: if ce.p50_ms > 0.0 {
            (cf.p50_ms / ce.p50_ms * 100.0).round() / 100.0
        } else {
            0.0
        },
        create_empty: ce,
        create_full: cf,
        fill_per_second,
        list_pages: n_pages,
        list_entries: entries,
        list_total_ms: (list_total.as_secs_f64() * 1e6).round() / 1e3,
        list_page: pages.summary().remove(0),
        delete_per_second,
        paging_ok,
        list_missing: missing,
        list_overfull_pages: overfull,
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "{} volumes; filled at {:.0} creates/s; CreateVolume p50 {:.3} ms empty vs {:.3} ms full ({:.2}x)",
            report.volumes, report.fill_per_second, report.create_empty.p50_ms, report.create_full.p50_ms, report.p50_ratio_full_to_empty
        );
        println!(
            "ListVolumes: {} entries in {} pages of {} in {:.1} ms",
            report.list_entries, report.list_pages, a.page_size, report.list_total_ms
        );
        print_table(&[
            report.create_empty.clone(),
            report.create_full.clone(),
            report.list_page.clone(),
        ]);
        if !report.paging_ok {
            println!(
                "ListVolumes pages wrongly: {} of the volumes created were never listed, {} pages held more than the {} entries asked for",
                report.list_missing, report.list_overfull_pages, a.page_size
            );
        }
        if let Some(d) = report.delete_per_second {
            println!("deleted everything at {d:.0} deletes/s");
        }
    }
    Ok(0)
}
