// Command soakload sends `make soak`'s load: an open loop of claims, coupon reads,
// keyed retries and follow-ups, mixed like a sale, against one gateway, for as long as
// it is told (bench/soak.py runs it, reads its lines and judges them).
//
// It is compiled (Go, standard library only) for the reason bench/openloop is: a Python
// client spends about a millisecond of CPU a request, which on the two cores the
// services use would slow what it measures. Arrival i is due at i/rate from the start,
// whatever became of the earlier ones; each latency counts from when it was due.
//
// A claim behaves as flashclaim/devtools/client.py's: an Idempotency-Key each, retried
// with it after a 503, a 429 or a lost connection (backing off, see retryDelay), a 202
// followed at its Location (ever less often), until a final answer (200, 400, 404, 409,
// 422) or the deadline.
//
// The coupons: -warm coupons whose stock outlasts the run, made first, and each minute
// a drop of -hot coupons of -hot-stock each, which the hot share of the claims goes to
// from when they exist. Users are <tag>_<n> for n below -users, so some claim twice.
//
// Output, one line an event on stdout, as it happens:
//
//	coupon <name> <amount>
//	claim <due µs> <latency µs> <status> <retries> <user> <coupon> <request id or ->
//	retry <due µs> <latency µs> <status> <same answer 0/1>
//	follow <due µs> <latency µs> <status> <same answer 0/1>
//	read <due µs> <latency µs> <status>
//	mismatch <what differed>
//	start                          (the first arrival is due)
//	done <due> <sent> <not sent: too many in flight>
package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"math/rand"
	"net"
	"net/http"
	"os"
	"reflect"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

var final = map[int]bool{200: true, 400: true, 404: true, 409: true, 422: true}

type answer struct {
	status  int
	body    map[string]any
	retries int
}

type granted struct {
	key, user, coupon string
	status            int
	body              map[string]any
}

type load struct {
	base     string
	client   *http.Client
	deadline time.Duration
	out      *bufio.Writer
	outMu    sync.Mutex
	recentMu sync.Mutex
	recent   []granted // the last claims answered finally, a ring
	next     int
	hot      atomic.Value // []string
	warm     []string
}

func (l *load) emit(format string, args ...any) {
	l.outMu.Lock()
	fmt.Fprintf(l.out, format+"\n", args...)
	l.outMu.Unlock()
}

func (l *load) flush() {
	l.outMu.Lock()
	l.out.Flush()
	l.outMu.Unlock()
}

// do sends one request; the status, the parsed JSON object (nil if none), Retry-After
// and Location, or an error when no answer came.
func (l *load) do(method, url string, body []byte, header map[string]string) (int, map[string]any, string, string, error) {
	var reader io.Reader
	if body != nil {
		reader = bytes.NewReader(body)
	}
	req, err := http.NewRequest(method, url, reader)
	if err != nil {
		return 0, nil, "", "", err
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	for k, v := range header {
		req.Header.Set(k, v)
	}
	resp, err := l.client.Do(req)
	if err != nil {
		return 0, nil, "", "", err
	}
	defer resp.Body.Close()
	raw, err := io.ReadAll(resp.Body)
	if err != nil {
		return 0, nil, "", "", err
	}
	var parsed map[string]any
	_ = json.Unmarshal(raw, &parsed)
	return resp.StatusCode, parsed, resp.Header.Get("Retry-After"), resp.Header.Get("Location"), nil
}

// Retries back off as flashclaim/devtools/client.py's do (see there why): a random time
// up to firstRetry*2^(n-1), at most maxBackoff, or Retry-After if that is longer; a 202 is
// followed every 200 ms, then at intervals growing by half up to maxPoll.
const (
	firstRetry = 250 * time.Millisecond
	maxBackoff = 5 * time.Second
	firstPoll  = 200 * time.Millisecond
	maxPoll    = 2 * time.Second
)

func retryDelay(retries int, retryAfter string) time.Duration {
	ceiling := firstRetry
	for i := 1; i < retries && ceiling < maxBackoff; i++ {
		ceiling *= 2
	}
	if ceiling > maxBackoff {
		ceiling = maxBackoff
	}
	delay := time.Duration(rand.Int63n(int64(ceiling) + 1))
	if seconds, err := strconv.ParseFloat(retryAfter, 64); err == nil && seconds > 0 {
		floor := time.Duration(seconds * float64(time.Second))
		if floor > maxBackoff {
			floor = maxBackoff
		}
		if floor > delay {
			delay = floor
		}
	}
	return delay
}

func pollDelay(polls int) time.Duration {
	delay := float64(firstPoll)
	for i := 0; i < polls && delay < float64(maxPoll); i++ {
		delay *= 1.5
	}
	if time.Duration(delay) > maxPoll {
		return maxPoll
	}
	return time.Duration(delay)
}

// claim: the claim's final answer, retried and followed as a careful client does.
func (l *load) claim(user, coupon, key string) answer {
	payload, _ := json.Marshal(map[string]string{"user_id": user, "coupon_name": coupon})
	header := map[string]string{"Idempotency-Key": key}
	end := time.Now().Add(l.deadline)
	location := ""
	a := answer{}
	polls := 0
	for time.Now().Before(end) {
		var status int
		var body map[string]any
		var retryAfter, loc string
		var err error
		if location == "" {
			status, body, retryAfter, loc, err = l.do("POST", l.base+"/api/coupons/claim", payload, header)
		} else {
			status, body, retryAfter, _, err = l.do("GET", l.base+location, nil, nil)
		}
		if err != nil {
			a.retries++
			time.Sleep(retryDelay(a.retries, ""))
			continue
		}
		if status == 202 && location == "" {
			if loc == "" {
				return answer{status, body, a.retries}
			}
			location = loc
			time.Sleep(pollDelay(polls))
			polls++
			continue
		}
		unseen := status == 404 && body != nil && body["code"] == "claim_not_found"
		if final[status] && !unseen {
			return answer{status, body, a.retries}
		}
		if status == 429 || status >= 500 {
			a.retries++
			time.Sleep(retryDelay(a.retries, retryAfter))
		} else {
			time.Sleep(pollDelay(polls))
			polls++
		}
	}
	a.status = 0
	if location != "" {
		a.status = 202
	}
	return a
}

// get: GET path until an answer that is not a 503 (a server away) or the deadline.
func (l *load) get(path string) (int, map[string]any) {
	end := time.Now().Add(l.deadline)
	tries := 0
	for time.Now().Before(end) {
		status, body, _, _, err := l.do("GET", l.base+path, nil, nil)
		if err == nil && status != 503 {
			return status, body
		}
		tries++
		time.Sleep(retryDelay(tries, ""))
	}
	return 0, nil
}

func (l *load) remember(g granted) {
	l.recentMu.Lock()
	defer l.recentMu.Unlock()
	if len(l.recent) < cap(l.recent) {
		l.recent = append(l.recent, g)
	} else {
		l.recent[l.next] = g
		l.next = (l.next + 1) % len(l.recent)
	}
}

// pick: a claim answered a moment ago (one granted, if onlyGranted), if any.
func (l *load) pick(onlyGranted bool) (granted, bool) {
	l.recentMu.Lock()
	defer l.recentMu.Unlock()
	if len(l.recent) == 0 {
		return granted{}, false
	}
	for tries := 0; tries < 20; tries++ {
		g := l.recent[rand.Intn(len(l.recent))]
		if !onlyGranted || g.status == 200 {
			return g, true
		}
	}
	return granted{}, false
}

func (l *load) create(name string, amount int) {
	payload, _ := json.Marshal(map[string]any{"name": name, "amount": amount})
	for {
		status, _, _, _, err := l.do("POST", l.base+"/api/coupons", payload, nil)
		if err == nil && (status == 201 || status == 409) {
			l.emit("coupon %s %d", name, amount)
			return
		}
		time.Sleep(500 * time.Millisecond)
	}
}

func (l *load) drop(tag string, minute, count, stock int) {
	names := make([]string, count)
	for j := range names {
		names[j] = fmt.Sprintf("SOAK_%s_HOT_%03d_%d", tag, minute, j)
		l.create(names[j], stock)
	}
	l.hot.Store(names)
}

func main() {
	base := flag.String("base", "http://127.0.0.1:8080", "the gateway")
	tag := flag.String("tag", "t", "in every coupon's and user's name")
	rate := flag.Float64("rate", 500, "arrivals a second")
	duration := flag.Duration("duration", time.Minute, "how long to send")
	warm := flag.Int("warm", 200, "coupons whose stock outlasts the run")
	hotCount := flag.Int("hot", 3, "hot coupons in each minute's drop")
	hotStock := flag.Int("hot-stock", 1000, "the stock of each hot coupon")
	users := flag.Int("users", 20000, "distinct users")
	readShare := flag.Float64("read", 0.10, "share of coupon reads")
	retryShare := flag.Float64("retry", 0.03, "share of keyed retries of a claim answered a moment ago")
	followShare := flag.Float64("follow", 0.02, "share of GET /api/claims/{id} of a claim granted a moment ago")
	hotShare := flag.Float64("hot-share", 0.35, "share of the claims on the minute's hot coupons")
	outstanding := flag.Int("max-outstanding", 20000, "requests in flight at most (more are not sent, and counted)")
	deadline := flag.Duration("deadline", 300*time.Second, "how long a request may take to its final answer")
	flag.Parse()
	rand.Seed(1)

	dialer := &net.Dialer{Timeout: 5 * time.Second}
	transport := &http.Transport{
		DialContext:         func(ctx context.Context, n, a string) (net.Conn, error) { return dialer.DialContext(ctx, n, a) },
		MaxIdleConnsPerHost: 2000,
		MaxConnsPerHost:     2000,
		IdleConnTimeout:     90 * time.Second,
	}
	l := &load{
		base:     strings.TrimRight(*base, "/"),
		client:   &http.Client{Transport: transport, Timeout: 30 * time.Second},
		deadline: *deadline,
		out:      bufio.NewWriterSize(os.Stdout, 1<<16),
		recent:   make([]granted, 0, 2000),
	}
	for i := 0; i < *warm; i++ {
		name := fmt.Sprintf("SOAK_%s_WARM_%03d", *tag, i)
		l.create(name, 1000000)
		l.warm = append(l.warm, name)
	}
	l.drop(*tag, 0, *hotCount, *hotStock)
	l.emit("start")
	l.flush()
	go func() { // the output reaches the reader at least every half second
		for range time.Tick(500 * time.Millisecond) {
			l.flush()
		}
	}()

	var wg sync.WaitGroup
	var inFlight, dropped int64
	total := int(*rate * duration.Seconds())
	interval := float64(time.Second) / *rate
	start := time.Now()
	minute := 0
	for i := 0; i < total; i++ {
		due := time.Duration(float64(i) * interval)
		if wait := due - time.Since(start); wait > 0 {
			time.Sleep(wait)
		}
		if m := int(due / time.Minute); m > minute {
			minute = m
			go l.drop(*tag, minute, *hotCount, *hotStock)
		}
		if atomic.LoadInt64(&inFlight) >= int64(*outstanding) {
			dropped++
			continue
		}
		r := rand.Float64()
		hot := l.hot.Load().([]string)
		var coupon string
		if rand.Float64() < *hotShare {
			coupon = hot[rand.Intn(len(hot))]
		} else {
			coupon = l.warm[rand.Intn(len(l.warm))]
		}
		user := fmt.Sprintf("soak_%s_%05d", *tag, rand.Intn(*users))
		atomic.AddInt64(&inFlight, 1)
		wg.Add(1)
		go func(due time.Duration) {
			defer wg.Done()
			defer atomic.AddInt64(&inFlight, -1)
			since := func() int64 { return (time.Since(start) - due).Microseconds() }
			switch {
			case r < *readShare:
				status, _ := l.get("/api/coupons/" + coupon)
				l.emit("read %d %d %d", due.Microseconds(), since(), status)
			case r < *readShare+*retryShare:
				if g, ok := l.pick(false); ok {
					a := l.claim(g.user, g.coupon, g.key)
					same := a.status == g.status && reflect.DeepEqual(a.body, g.body)
					l.emit("retry %d %d %d %d", due.Microseconds(), since(), a.status, b2i(same))
					if !same {
						l.emit("mismatch retry of %s: %d %v, first %d %v", g.key, a.status, a.body, g.status, g.body)
					}
				}
			case r < *readShare+*retryShare+*followShare:
				if g, ok := l.pick(true); ok {
					id, _ := g.body["request_id"].(string)
					status, body := l.get("/api/claims/" + id)
					same := status == 200 && reflect.DeepEqual(body, g.body)
					l.emit("follow %d %d %d %d", due.Microseconds(), since(), status, b2i(same))
					if !same {
						l.emit("mismatch follow-up of %s: %d %v, first %v", id, status, body, g.body)
					}
				}
			default:
				key := fmt.Sprintf("%016x%016x", rand.Uint64(), rand.Uint64())
				a := l.claim(user, coupon, key)
				id, _ := a.body["request_id"].(string)
				if id == "" {
					id = "-"
				}
				l.emit("claim %d %d %d %d %s %s %s", due.Microseconds(), since(), a.status, a.retries, user, coupon, id)
				if final[a.status] {
					l.remember(granted{key, user, coupon, a.status, a.body})
				}
			}
		}(due)
	}
	sent := total - int(dropped)
	wg.Wait()
	l.emit("done %d %d %d", total, sent, dropped)
	l.flush()
}

func b2i(b bool) int {
	if b {
		return 1
	}
	return 0
}
