package main

import (
	"encoding/json"
	"fmt"
	"html"
	"io"
	"math"
	"os"
	"path/filepath"
	"strings"
)

// record is one line of results.json: one library in one workload (and, for
// W2, one goroutine count; for W3, one critical section). A metric that does
// not apply to the workload is null.
type record struct {
	Library    string  `json:"library"`
	Workload   string  `json:"workload"`
	Goroutines int     `json:"goroutines"`
	CSus       float64 `json:"cs_us"`

	USPerPair      *float64 `json:"us_per_pair"`          // W1: µs per uncontended Lock+Unlock
	AcqPerS        *float64 `json:"acq_per_s"`            // W2: pairs/s; W3: acquisitions/s
	HandoffP50     *float64 `json:"handoff_p50_us"`       // W3: release to acquisition by another owner
	HandoffP99     *float64 `json:"handoff_p99_us"`       // W3
	WaitP99        *float64 `json:"wait_p99_ms"`          // W3: Lock call to acquisition
	WaitMax        *float64 `json:"wait_max_ms"`          // W3
	Jain           *float64 `json:"jain"`                 // W3: over the 16 goroutines
	RTPerAcq       *float64 `json:"rt_per_acq"`           // requests sent (+ (UN)SUBSCRIBE) per acquisition
	RedisCPUPerAcq *float64 `json:"redis_cpu_us_per_acq"` // INFO cpu delta per acquisition

	// Extras.
	RatioToFloor *float64 `json:"ratio_to_floor,omitempty"` // W1: us_per_pair / the floor's
	Handoffs     int      `json:"handoffs,omitempty"`       // W3: changes of owner counted
	CmdsPerAcq   *float64 `json:"cmds_per_acq,omitempty"`   // INFO commandstats, commands inside scripts included
	Errors       int      `json:"errors"`                   // failed Lock/Unlock calls (not ctx ends)

	HeldLocks           int      `json:"held_locks,omitempty"`              // W4
	PeriodMS            float64  `json:"period_ms,omitempty"`               // W4: renewal period
	RTPerPeriod         *float64 `json:"rt_per_period,omitempty"`           // W4: requests sent per period
	CmdsPerPeriod       *float64 `json:"cmds_per_period,omitempty"`         // W4: commandstats calls per period
	ScriptsPerPeriod    *float64 `json:"scripts_per_period,omitempty"`      // W4: EVALSHA/EVAL per period
	RedisCPUMsPerPeriod *float64 `json:"redis_cpu_ms_per_period,omitempty"` // W4
}

// num rounds x to 4 significant digits for the output.
func num(x float64) *float64 {
	if x == 0 || math.IsNaN(x) || math.IsInf(x, 0) {
		x = 0
		return &x
	}
	p := math.Pow(10, 3-math.Floor(math.Log10(math.Abs(x))))
	x = math.Round(x*p) / p
	return &x
}

func f(p *float64, format string) string {
	if p == nil {
		return "–"
	}
	return fmt.Sprintf(format, *p)
}

func writeJSON(path string, recs []record) error {
	b, err := json.MarshalIndent(recs, "", "  ")
	if err != nil {
		return err
	}
	return os.WriteFile(path, append(b, '\n'), 0o644)
}

// writeTables prints the results as markdown tables.
func writeTables(w io.Writer, recs []record, header string) {
	fmt.Fprintf(w, "%s\n\n", header)
	by := func(wl string, keep func(record) bool) []record {
		var out []record
		for _, r := range recs {
			if r.Workload == wl && (keep == nil || keep(r)) {
				out = append(out, r)
			}
		}
		return out
	}
	errs := func(r record) string {
		if r.Errors > 0 {
			return fmt.Sprintf(" (%d errors)", r.Errors)
		}
		return ""
	}

	if w1 := by("W1", nil); len(w1) > 0 {
		fmt.Fprintln(w, "### W1: uncontended Lock+Unlock, one goroutine")
		fmt.Fprintln(w)
		fmt.Fprintln(w, "| library | µs/pair | × floor | round trips/pair | Redis CPU µs/pair |")
		fmt.Fprintln(w, "|---|--:|--:|--:|--:|")
		for _, r := range w1 {
			fmt.Fprintf(w, "| %s%s | %s | %s | %s | %s |\n", r.Library, errs(r), f(r.USPerPair, "%.1f"),
				f(r.RatioToFloor, "%.2f"), f(r.RTPerAcq, "%.2f"), f(r.RedisCPUPerAcq, "%.1f"))
		}
		fmt.Fprintln(w)
	}

	if w2 := by("W2", nil); len(w2) > 0 {
		var gs []int
		rows := map[string]map[int]record{}
		var names []string
		for _, r := range w2 {
			if rows[r.Library] == nil {
				rows[r.Library] = map[int]record{}
				names = append(names, r.Library)
			}
			if !containsInt(gs, r.Goroutines) {
				gs = append(gs, r.Goroutines)
			}
			rows[r.Library][r.Goroutines] = r
		}
		fmt.Fprintln(w, "### W2: distinct keys, pairs/s by goroutines")
		fmt.Fprintln(w)
		fmt.Fprint(w, "| library |")
		for _, g := range gs {
			fmt.Fprintf(w, " %d |", g)
		}
		fmt.Fprint(w, "\n|---|")
		for range gs {
			fmt.Fprint(w, "--:|")
		}
		fmt.Fprintln(w)
		for _, n := range names {
			fmt.Fprintf(w, "| %s |", n)
			for _, g := range gs {
				r := rows[n][g]
				fmt.Fprintf(w, " %s%s |", f(r.AcqPerS, "%.0f"), errs(r))
			}
			fmt.Fprintln(w)
		}
		fmt.Fprintln(w)
	}

	for _, cs := range w3CSValues(recs) {
		w3 := by("W3", func(r record) bool { return r.CSus == cs })
		fmt.Fprintf(w, "### W3: one hot key, 16 goroutines over 2 clients, critical section %gµs\n\n", cs)
		fmt.Fprintln(w, "| library | acq/s | handoffs | handoff p50 µs | handoff p99 µs | wait p99 ms | wait max ms | Jain | round trips/acq | Redis CPU µs/acq | commands/acq |")
		fmt.Fprintln(w, "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|")
		for _, r := range w3 {
			fmt.Fprintf(w, "| %s%s | %s | %d | %s | %s | %s | %s | %s | %s | %s | %s |\n", r.Library, errs(r),
				f(r.AcqPerS, "%.0f"), r.Handoffs, f(r.HandoffP50, "%.0f"), f(r.HandoffP99, "%.0f"),
				f(r.WaitP99, "%.2f"), f(r.WaitMax, "%.2f"), f(r.Jain, "%.3f"),
				f(r.RTPerAcq, "%.2f"), f(r.RedisCPUPerAcq, "%.1f"), f(r.CmdsPerAcq, "%.2f"))
		}
		fmt.Fprintln(w)
	}

	if w4 := by("W4", nil); len(w4) > 0 {
		fmt.Fprintln(w, "### W4: watchdog renewal, redlatch")
		fmt.Fprintln(w)
		fmt.Fprintln(w, "| library | held locks | period ms | round trips/period | commands/period | scripts/period | Redis CPU ms/period |")
		fmt.Fprintln(w, "|---|--:|--:|--:|--:|--:|--:|")
		for _, r := range w4 {
			fmt.Fprintf(w, "| %s%s | %d | %.0f | %s | %s | %s | %s |\n", r.Library, errs(r), r.HeldLocks, r.PeriodMS,
				f(r.RTPerPeriod, "%.1f"), f(r.CmdsPerPeriod, "%.0f"), f(r.ScriptsPerPeriod, "%.0f"), f(r.RedisCPUMsPerPeriod, "%.2f"))
		}
		fmt.Fprintln(w)
	}
}

func containsInt(s []int, x int) bool {
	for _, v := range s {
		if v == x {
			return true
		}
	}
	return false
}

func w3CSValues(recs []record) []float64 {
	var out []float64
	seen := map[float64]bool{}
	for _, r := range recs {
		if r.Workload == "W3" && !seen[r.CSus] {
			seen[r.CSus] = true
			out = append(out, r.CSus)
		}
	}
	return out
}

// writeChart draws W3's wait p99/max (log scale) and Redis CPU per
// acquisition per library, one row of two panels per critical section, as
// a self-contained SVG.
func writeChart(path string, recs []record, subtitle string) error {
	css := w3CSValues(recs)
	var libs []string
	for _, r := range recs {
		if r.Workload == "W3" && !containsStr(libs, r.Library) {
			libs = append(libs, r.Library)
		}
	}
	const (
		width    = 1000
		labelW   = 230 // library names
		panelW   = 330
		gap      = 60
		rowH     = 26
		top      = 56
		sectionT = 44 // section title and axis labels
	)
	sectionH := sectionT + rowH*len(libs) + 34
	height := top + sectionH*len(css) + 40
	var b strings.Builder
	fmt.Fprintf(&b, `<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" viewBox="0 0 %d %d" font-family="Helvetica, Arial, sans-serif" font-size="12">`+"\n", width, height, width, height)
	fmt.Fprintf(&b, `<rect width="100%%" height="100%%" fill="#fff"/>`+"\n")
	fmt.Fprintf(&b, `<text x="%d" y="24" font-size="17" font-weight="bold">W3: one hot key, 16 goroutines over 2 clients</text>`+"\n", 16)
	fmt.Fprintf(&b, `<text x="%d" y="42" fill="#555">%s</text>`+"\n", 16, html.EscapeString(subtitle))

	// Wait scale: log10 from 0.01ms up to the next power of ten over the max.
	wmax := 0.1
	cmax := 1.0
	for _, r := range recs {
		if r.Workload != "W3" {
			continue
		}
		if r.WaitMax != nil {
			wmax = math.Max(wmax, *r.WaitMax)
		}
		if r.WaitP99 != nil {
			wmax = math.Max(wmax, *r.WaitP99)
		}
		if r.RedisCPUPerAcq != nil {
			cmax = math.Max(cmax, *r.RedisCPUPerAcq)
		}
	}
	const wlo = 0.01
	whi := math.Pow(10, math.Ceil(math.Log10(wmax)))
	wx := func(v float64) float64 {
		v = math.Max(v, wlo)
		return panelW * math.Log10(v/wlo) / math.Log10(whi/wlo)
	}
	cstep := niceStep(cmax / 4)
	chi := math.Ceil(cmax/cstep) * cstep
	cx := func(v float64) float64 { return panelW * v / chi }

	x1 := float64(labelW)
	x2 := x1 + panelW + gap
	for si, cs := range css {
		y0 := float64(top + si*sectionH)
		fmt.Fprintf(&b, `<text x="16" y="%.0f" font-size="14" font-weight="bold">critical section %gµs</text>`+"\n", y0+16, cs)
		fmt.Fprintf(&b, `<text x="%.0f" y="%.0f" fill="#333">wait from Lock call to acquisition, ms (log scale): <tspan fill="#1f5fa8">■ p99</tspan> <tspan fill="#9cc0ea">■ max</tspan></text>`+"\n", x1, y0+36)
		fmt.Fprintf(&b, `<text x="%.0f" y="%.0f" fill="#333">Redis CPU per acquisition, µs <tspan fill="#c0504d">■</tspan></text>`+"\n", x2, y0+36)
		gy := y0 + sectionT
		gh := float64(rowH * len(libs))
		// Grid lines and ticks.
		for v := wlo; v <= whi*1.0001; v *= 10 {
			x := x1 + wx(v)
			fmt.Fprintf(&b, `<line x1="%.1f" y1="%.0f" x2="%.1f" y2="%.0f" stroke="#ddd"/>`+"\n", x, gy, x, gy+gh)
			fmt.Fprintf(&b, `<text x="%.1f" y="%.0f" text-anchor="middle" fill="#555">%s</text>`+"\n", x, gy+gh+14, trimNum(v))
		}
		for v := 0.0; v <= chi*1.0001; v += cstep {
			x := x2 + cx(v)
			fmt.Fprintf(&b, `<line x1="%.1f" y1="%.0f" x2="%.1f" y2="%.0f" stroke="#ddd"/>`+"\n", x, gy, x, gy+gh)
			fmt.Fprintf(&b, `<text x="%.1f" y="%.0f" text-anchor="middle" fill="#555">%s</text>`+"\n", x, gy+gh+14, trimNum(v))
		}
		for li, lib := range libs {
			var r *record
			for i := range recs {
				if recs[i].Workload == "W3" && recs[i].CSus == cs && recs[i].Library == lib {
					r = &recs[i]
				}
			}
			y := gy + float64(li*rowH)
			fmt.Fprintf(&b, `<text x="%.0f" y="%.0f" text-anchor="end">%s</text>`+"\n", x1-8, y+rowH/2+4, html.EscapeString(lib))
			if r == nil || r.WaitMax == nil {
				fmt.Fprintf(&b, `<text x="%.0f" y="%.0f" fill="#999">no acquisition</text>`+"\n", x1+4, y+rowH/2+4)
				continue
			}
			bh := float64(rowH-6) / 2
			p99, mx := *r.WaitP99, *r.WaitMax
			fmt.Fprintf(&b, `<rect x="%.0f" y="%.1f" width="%.1f" height="%.1f" fill="#9cc0ea"><title>wait max %s ms</title></rect>`+"\n", x1, y+3+bh, math.Max(wx(mx), 1), bh, trimNum(mx))
			fmt.Fprintf(&b, `<rect x="%.0f" y="%.1f" width="%.1f" height="%.1f" fill="#1f5fa8"><title>wait p99 %s ms</title></rect>`+"\n", x1, y+3, math.Max(wx(p99), 1), bh, trimNum(p99))
			fmt.Fprintf(&b, `<text x="%.1f" y="%.1f" font-size="10" fill="#1f5fa8">%s</text>`+"\n", x1+math.Max(wx(p99), 1)+3, y+3+bh-1, trimNum(p99))
			fmt.Fprintf(&b, `<text x="%.1f" y="%.1f" font-size="10" fill="#5a86bd">%s</text>`+"\n", x1+math.Max(wx(mx), 1)+3, y+3+2*bh-1, trimNum(mx))
			cpu := 0.0
			if r.RedisCPUPerAcq != nil {
				cpu = *r.RedisCPUPerAcq
			}
			fmt.Fprintf(&b, `<rect x="%.0f" y="%.1f" width="%.1f" height="%.1f" fill="#c0504d"><title>Redis CPU %s µs/acq</title></rect>`+"\n", x2, y+5, math.Max(cx(cpu), 1), float64(rowH-10), trimNum(cpu))
			fmt.Fprintf(&b, `<text x="%.1f" y="%.1f" font-size="10" fill="#8a2f2c">%s</text>`+"\n", x2+math.Max(cx(cpu), 1)+3, y+rowH/2+4, trimNum(cpu))
		}
		fmt.Fprintf(&b, `<line x1="%.0f" y1="%.0f" x2="%.0f" y2="%.0f" stroke="#333"/>`+"\n", x1, gy, x1, gy+gh)
		fmt.Fprintf(&b, `<line x1="%.0f" y1="%.0f" x2="%.0f" y2="%.0f" stroke="#333"/>`+"\n", x2, gy, x2, gy+gh)
	}
	fmt.Fprintf(&b, `<text x="16" y="%d" fill="#777" font-size="11">%s</text>`+"\n", height-14,
		html.EscapeString("Generated by the redlatch bench command (cd bench && go run .). Shorter is better in both panels."))
	b.WriteString("</svg>\n")
	return os.WriteFile(path, []byte(b.String()), 0o644)
}

func containsStr(s []string, x string) bool {
	for _, v := range s {
		if v == x {
			return true
		}
	}
	return false
}

// niceStep rounds x up to 1, 2 or 5 times a power of ten.
func niceStep(x float64) float64 {
	if x <= 0 {
		return 1
	}
	p := math.Pow(10, math.Floor(math.Log10(x)))
	for _, m := range []float64{1, 2, 5, 10} {
		if m*p >= x {
			return m * p
		}
	}
	return 10 * p
}

// trimNum formats v compactly: 0.01, 2.5, 120, 1500.
func trimNum(v float64) string {
	switch {
	case v == 0:
		return "0"
	case math.Abs(v) >= 100:
		return fmt.Sprintf("%.0f", v)
	case math.Abs(v) >= 10:
		return strings.TrimSuffix(strings.TrimRight(fmt.Sprintf("%.1f", v), "0"), ".")
	default:
		return strings.TrimSuffix(strings.TrimRight(fmt.Sprintf("%.2f", v), "0"), ".")
	}
}

func outPaths(dir string) (jsonPath, chartPath string) {
	return filepath.Join(dir, "results.json"), filepath.Join(dir, "chart.svg")
}
