// Command openloop sends claims at a fixed rate, whatever became of the earlier ones,
// and writes each one's latency measured from the moment it was due (an open loop:
// a slow answer cannot slow the load down and hide itself, as a closed loop would).
//
// It is compiled (Go, standard library only) so that the load costs little CPU beside
// what it measures: `make bench` runs it on the two cores the services use. Output, one
// line a request on stdout: "<due offset µs> <latency µs> <status> <retry-after>" (status
// 0: no answer, the error on stderr once per kind; retry-after 1 when the answer had a
// Retry-After header); then a summary line on stderr. -phases replaces -rate and
// -duration with rates in turn ("900:10s,2700:120s,900:20s").
//
//	openloop -url http://127.0.0.1:18080/api/coupons/claim -coupon HOT -rate 1000 -duration 10s
package main

import (
	"bufio"
	"bytes"
	"context"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

type result struct {
	due        time.Duration // since the start
	latency    time.Duration
	status     int
	retryAfter bool
}

type phase struct {
	rate     float64
	duration time.Duration
}

// parsePhases reads "rate:duration,..." ("2700:120s").
func parsePhases(text string) ([]phase, error) {
	var phases []phase
	for _, part := range strings.Split(text, ",") {
		fields := strings.SplitN(strings.TrimSpace(part), ":", 2)
		if len(fields) != 2 {
			return nil, fmt.Errorf("phase %q is not rate:duration", part)
		}
		rate, err := strconv.ParseFloat(fields[0], 64)
		if err != nil || rate <= 0 {
			return nil, fmt.Errorf("phase %q: the rate is not a positive number", part)
		}
		duration, err := time.ParseDuration(fields[1])
		if err != nil || duration <= 0 {
			return nil, fmt.Errorf("phase %q: the duration is not a positive duration", part)
		}
		phases = append(phases, phase{rate, duration})
	}
	return phases, nil
}

func main() {
	url := flag.String("url", "http://127.0.0.1:8080/api/coupons/claim", "the claim endpoint")
	coupon := flag.String("coupon", "", "the coupon every claim is for")
	users := flag.String("users", "openloop", "user ids are <users>_<n>")
	rate := flag.Float64("rate", 1000, "claims a second")
	duration := flag.Duration("duration", 10*time.Second, "how long to send")
	timeout := flag.Duration("timeout", 30*time.Second, "how long to wait for one answer")
	outstanding := flag.Int("max-outstanding", 20000, "claims in flight at most (more are not sent, and counted)")
	connections := flag.Int("connections", 512, "connections at most; a claim due when all are busy waits for one (its wait counts)")
	phaseList := flag.String("phases", "", "rates in turn, rate:duration,... (instead of -rate and -duration)")
	flag.Parse()
	if *coupon == "" || *rate <= 0 {
		fmt.Fprintln(os.Stderr, "openloop: -coupon and a positive -rate are required")
		os.Exit(2)
	}
	phases := []phase{{*rate, *duration}}
	if *phaseList != "" {
		var err error
		if phases, err = parsePhases(*phaseList); err != nil {
			fmt.Fprintln(os.Stderr, "openloop:", err)
			os.Exit(2)
		}
	}
	// Every claim's due time from the start, phase after phase.
	var schedule []time.Duration
	var offset time.Duration
	for _, p := range phases {
		interval := time.Duration(float64(time.Second) / p.rate)
		count := int(p.rate * p.duration.Seconds())
		for i := 0; i < count; i++ {
			schedule = append(schedule, offset+time.Duration(i)*interval)
		}
		offset += p.duration
	}

	var dials int64
	dialer := &net.Dialer{Timeout: 5 * time.Second}
	transport := &http.Transport{
		DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			atomic.AddInt64(&dials, 1)
			return dialer.DialContext(ctx, network, addr)
		},
		MaxIdleConns:        0,
		MaxIdleConnsPerHost: *connections,
		MaxConnsPerHost:     *connections,
		IdleConnTimeout:     90 * time.Second,
	}
	client := &http.Client{Transport: transport, Timeout: *timeout}

	total := len(schedule)
	results := make([]result, 0, total)
	var mu sync.Mutex
	var wg sync.WaitGroup
	var inFlight, dropped int64
	var errorsSeen sync.Map

	send := func(i int, due time.Duration, start time.Time) {
		defer wg.Done()
		defer atomic.AddInt64(&inFlight, -1)
		body := []byte(fmt.Sprintf(`{"user_id":"%s_%d","coupon_name":"%s"}`, *users, i, *coupon))
		status := 0
		retryAfter := false
		resp, err := client.Post(*url, "application/json", bytes.NewReader(body))
		if err == nil {
			_, _ = io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			status = resp.StatusCode
			retryAfter = resp.Header.Get("Retry-After") != ""
		} else if _, seen := errorsSeen.LoadOrStore(fmt.Sprintf("%T", err), true); !seen {
			fmt.Fprintln(os.Stderr, "openloop:", err)
		}
		latency := time.Since(start) - due
		mu.Lock()
		results = append(results, result{due, latency, status, retryAfter})
		mu.Unlock()
	}

	start := time.Now()
	for i, due := range schedule {
		if wait := due - time.Since(start); wait > 0 {
			time.Sleep(wait)
		}
		if atomic.LoadInt64(&inFlight) >= int64(*outstanding) {
			dropped++
			continue
		}
		atomic.AddInt64(&inFlight, 1)
		wg.Add(1)
		go send(i, due, start)
	}
	sent := time.Since(start)
	wg.Wait()

	out := bufio.NewWriterSize(os.Stdout, 1<<16)
	for _, r := range results {
		flagged := 0
		if r.retryAfter {
			flagged = 1
		}
		fmt.Fprintf(out, "%d %d %d %d\n", r.due.Microseconds(), r.latency.Microseconds(), r.status, flagged)
	}
	out.Flush()
	fmt.Fprintf(os.Stderr, "openloop: %d due, %d sent in %.2f s, %d answered, %d not sent (too many in flight), %d connections opened\n",
		total, total-int(dropped), sent.Seconds(), len(results), dropped, atomic.LoadInt64(&dials))
}
