package main

import (
	"bytes"
	"crypto/subtle"
	"errors"
	"flag"
	"fmt"
	"log"
	"net"
	"net/http"
	"net/http/cgi"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"time"
)

// devhostInfo is the line `devhost` prints once both servers listen.
type devhostInfo struct {
	HTTPPort int    `json:"http_port"`
	GitPort  int    `json:"git_port"`
	GitPath  string `json:"git_path"` // URL path of the repository on the git port, e.g. "/lab.git"
	// The same repository from a server that ignores the Git-Protocol header, as servers that
	// speak only protocol version 0 do.
	GitV0Path string `json:"git_v0_path"`
	// The same repository behind HTTP basic authentication (the --git-auth-file credentials);
	// empty without that flag.
	GitAuthPath string `json:"git_auth_path"`
	RepoDir     string `json:"repo_dir"` // the bare repository on disk, for reading its refs
}

const (
	repoName = "lab.git"
	// Largest body /large will produce and longest /slow will wait: generous for tests, but a
	// typo cannot wedge the lab.
	maxLargeBytes = 1 << 30
	maxSlow       = 10 * time.Minute
	maxRedirects  = 20
)

func runDevhost(args []string) error {
	fs := flag.NewFlagSet("devhost", flag.ExitOnError)
	dir := fs.String("dir", "", "directory for the lab repository (created if missing)")
	httpListen := fs.String("http-listen", "127.0.0.1:0", "address for the HTTP server")
	gitListen := fs.String("git-listen", "127.0.0.1:0", "address for the git smart-HTTP server")
	gitAuthFile := fs.String("git-auth-file", "", "file holding user:password for the git server's /auth/ path")
	fs.Parse(args)
	if *dir == "" {
		return errors.New("--dir is required")
	}
	var gitAuth []byte
	if *gitAuthFile != "" {
		b, err := os.ReadFile(*gitAuthFile)
		if err != nil {
			return fmt.Errorf("reading --git-auth-file: %w", err)
		}
		gitAuth = bytes.TrimSpace(b)
		if !bytes.Contains(gitAuth, []byte(":")) {
			return errors.New("--git-auth-file must hold user:password")
		}
	}
	root, err := filepath.Abs(filepath.Join(*dir, "repos"))
	if err != nil {
		return err
	}
	gitBin, err := exec.LookPath("git")
	if err != nil {
		return fmt.Errorf("the dev host needs git: %w", err)
	}
	repo := filepath.Join(root, repoName)
	if err := ensureLabRepo(gitBin, repo, filepath.Join(*dir, "work")); err != nil {
		return fmt.Errorf("creating the lab repository: %w", err)
	}

	httpLn, err := net.Listen("tcp", *httpListen)
	if err != nil {
		return fmt.Errorf("http listen: %w", err)
	}
	gitLn, err := net.Listen("tcp", *gitListen)
	if err != nil {
		return fmt.Errorf("git listen: %w", err)
	}
	go serveOrDie("http", httpLn, logRequests("http", httpMux()))
	gitMux := http.NewServeMux()
	gitMux.Handle("/", gitHandler(gitBin, root, *dir, true))
	gitMux.Handle("/v0/", http.StripPrefix("/v0", gitHandler(gitBin, root, *dir, false)))
	info := devhostInfo{
		HTTPPort:  httpLn.Addr().(*net.TCPAddr).Port,
		GitPort:   gitLn.Addr().(*net.TCPAddr).Port,
		GitPath:   "/" + repoName,
		GitV0Path: "/v0/" + repoName,
		RepoDir:   repo,
	}
	if gitAuth != nil {
		gitMux.Handle("/auth/", requireBasicAuth(gitAuth, http.StripPrefix("/auth", gitHandler(gitBin, root, *dir, true))))
		info.GitAuthPath = "/auth/" + repoName
	}
	go serveOrDie("git", gitLn, logRequests("git", gitMux))

	if err := announce(info); err != nil {
		return err
	}
	log.Printf("devhost serving http on %s and git on %s", httpLn.Addr(), gitLn.Addr())
	log.Printf("devhost shutting down: %s", waitForShutdown())
	return nil
}

func logRequests(name string, h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		log.Printf("%s: %s %s from %s", name, r.Method, r.URL.RequestURI(), r.RemoteAddr)
		h.ServeHTTP(w, r)
	})
}

// httpMux is the dev host's plain HTTP service: a health check plus knobs that let tests pick
// the status, latency and size of a response.
func httpMux() *http.ServeMux {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /health", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		fmt.Fprint(w, "ok")
	})
	mux.HandleFunc("GET /status/{code}", func(w http.ResponseWriter, r *http.Request) {
		code, err := strconv.Atoi(r.PathValue("code"))
		if err != nil || code < 200 || code > 599 {
			http.Error(w, "status code must be 200..599", http.StatusBadRequest)
			return
		}
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		w.WriteHeader(code)
		fmt.Fprintf(w, "status %d\n", code)
	})
	mux.HandleFunc("GET /slow", func(w http.ResponseWriter, r *http.Request) {
		ms, err := strconv.Atoi(r.URL.Query().Get("ms"))
		if err != nil || ms < 0 || time.Duration(ms)*time.Millisecond > maxSlow {
			http.Error(w, fmt.Sprintf("ms must be 0..%d", maxSlow.Milliseconds()), http.StatusBadRequest)
			return
		}
		select {
		case <-time.After(time.Duration(ms) * time.Millisecond):
			fmt.Fprint(w, "ok")
		case <-r.Context().Done():
		}
	})
	mux.HandleFunc("GET /large", func(w http.ResponseWriter, r *http.Request) {
		n, err := strconv.ParseInt(r.URL.Query().Get("bytes"), 10, 64)
		if err != nil || n < 0 || n > maxLargeBytes {
			http.Error(w, fmt.Sprintf("bytes must be 0..%d", maxLargeBytes), http.StatusBadRequest)
			return
		}
		w.Header().Set("Content-Type", "application/octet-stream")
		w.Header().Set("Content-Length", strconv.FormatInt(n, 10))
		// A fixed pattern so a client can check what it got without us hashing anything.
		chunk := bytes.Repeat([]byte("tailbox-lab\n"), 8192)
		for n > 0 {
			m := min(n, int64(len(chunk)))
			if _, err := w.Write(chunk[:m]); err != nil {
				return
			}
			n -= m
		}
	})
	mux.HandleFunc("GET /redirect/{n}", func(w http.ResponseWriter, r *http.Request) {
		n, err := strconv.Atoi(r.PathValue("n"))
		if err != nil || n < 1 || n > maxRedirects {
			http.Error(w, fmt.Sprintf("n must be 1..%d", maxRedirects), http.StatusBadRequest)
			return
		}
		// A chain of n relative redirects that ends at /health.
		next := "/health"
		if n > 1 {
			next = fmt.Sprintf("/redirect/%d", n-1)
		}
		http.Redirect(w, r, next, http.StatusFound)
	})
	mux.HandleFunc("GET /{$}", func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprint(w, "tailbox lab dev host: /health, /status/<code>, /slow?ms=N, /large?bytes=N, /redirect/<n>\n")
	})
	return mux
}

// gitHandler runs the real `git http-backend` as CGI, so clients speak to stock git. With
// passProtocol false it drops the Git-Protocol header, like a server that only speaks protocol
// version 0.
func gitHandler(gitBin, projectRoot, home string, passProtocol bool) http.Handler {
	base := cgi.Handler{
		Path: gitBin,
		Args: []string{"http-backend"},
		Root: "/",
		Env: append(isolatedGitEnv(home),
			"GIT_PROJECT_ROOT="+projectRoot,
			"GIT_HTTP_EXPORT_ALL=1",
		),
		Stderr: os.Stderr,
	}
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if !passProtocol {
			// Go's CGI would also pass it on as HTTP_GIT_PROTOCOL, which newer git reads.
			r.Header.Del("Git-Protocol")
		}
		h := base
		// Protocol v2 is negotiated through the Git-Protocol header. CGI exposes it only as
		// HTTP_GIT_PROTOCOL, which not every git release reads, so hand it over as GIT_PROTOCOL,
		// the variable upload-pack itself looks at.
		if p := r.Header.Get("Git-Protocol"); p != "" && validGitProtocol(p) {
			h.Env = append(append([]string(nil), base.Env...), "GIT_PROTOCOL="+p)
		}
		h.ServeHTTP(w, r)
	})
}

// requireBasicAuth serves h only to requests with the credentials in userPass ("user:password");
// others get 401 with a challenge, as git servers do.
func requireBasicAuth(userPass []byte, h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		user, pass, ok := r.BasicAuth()
		given := []byte(user + ":" + pass)
		if !ok || subtle.ConstantTimeCompare(given, userPass) != 1 {
			w.Header().Set("WWW-Authenticate", `Basic realm="tailbox lab"`)
			http.Error(w, "authentication required", http.StatusUnauthorized)
			return
		}
		h.ServeHTTP(w, r)
	})
}

// validGitProtocol accepts the header's grammar (colon-separated key[=value] items) and nothing
// that could smuggle another variable into the CGI environment.
func validGitProtocol(s string) bool {
	for _, c := range s {
		ok := c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' ||
			strings.ContainsRune("=:._-", c)
		if !ok {
			return false
		}
	}
	return len(s) <= 256
}

// isolatedGitEnv keeps the host's git configuration out of the lab, so the repository and the
// server behave the same on every machine.
func isolatedGitEnv(home string) []string {
	return []string{
		"HOME=" + home,
		"GIT_CONFIG_NOSYSTEM=1",
		"GIT_CONFIG_GLOBAL=/dev/null",
	}
}

// ensureLabRepo creates the bare repository the dev host serves, with known refs: main (two
// commits), feature (one more), an annotated tag v0.1.0 on main, and HEAD -> refs/heads/main.
// Dates and identities are fixed so the shas are the same on every run; tests still read them
// back with `git show-ref` rather than trusting that.
func ensureLabRepo(gitBin, repo, work string) error {
	if _, err := os.Stat(filepath.Join(repo, "HEAD")); err == nil {
		return nil
	}
	env := []string{}
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "GIT_") {
			env = append(env, kv)
		}
	}
	env = append(env, isolatedGitEnv(filepath.Dir(work))...)
	env = append(env,
		"GIT_AUTHOR_NAME=tailbox lab", "GIT_AUTHOR_EMAIL=lab@tailbox.invalid",
		"GIT_COMMITTER_NAME=tailbox lab", "GIT_COMMITTER_EMAIL=lab@tailbox.invalid",
		"GIT_AUTHOR_DATE=2025-01-01T00:00:00Z", "GIT_COMMITTER_DATE=2025-01-01T00:00:00Z",
	)
	git := func(dir string, args ...string) error {
		cmd := exec.Command(gitBin, args...)
		cmd.Dir = dir
		cmd.Env = env
		out, err := cmd.CombinedOutput()
		if err != nil {
			return fmt.Errorf("git %s: %v: %s", strings.Join(args, " "), err, out)
		}
		return nil
	}
	write := func(name, content string) error {
		return os.WriteFile(filepath.Join(work, name), []byte(content), 0o644)
	}
	if err := os.MkdirAll(work, 0o755); err != nil {
		return err
	}
	defer os.RemoveAll(work)
	if err := os.MkdirAll(filepath.Dir(repo), 0o755); err != nil {
		return err
	}
	steps := []func() error{
		func() error { return git(filepath.Dir(repo), "init", "-q", "--bare", repo) },
		// Set explicitly: older git has no --initial-branch and newer may default elsewhere.
		func() error { return git(repo, "symbolic-ref", "HEAD", "refs/heads/main") },
		func() error { return git(work, "init", "-q", ".") },
		func() error { return git(work, "symbolic-ref", "HEAD", "refs/heads/main") },
		func() error { return write("README.md", "tailbox lab repository\n") },
		func() error { return git(work, "add", "README.md") },
		func() error { return git(work, "commit", "-q", "-m", "initial commit") },
		func() error { return write("hello.txt", "hello from the dev host\n") },
		func() error { return git(work, "add", "hello.txt") },
		func() error { return git(work, "commit", "-q", "-m", "second commit on main") },
		func() error { return git(work, "tag", "-a", "v0.1.0", "-m", "lab release v0.1.0") },
		func() error { return git(work, "checkout", "-q", "-b", "feature") },
		func() error { return write("feature.txt", "work in progress\n") },
		func() error { return git(work, "add", "feature.txt") },
		func() error { return git(work, "commit", "-q", "-m", "feature work") },
		func() error {
			return git(work, "push", "-q", repo, "refs/heads/main", "refs/heads/feature", "refs/tags/v0.1.0")
		},
	}
	for _, step := range steps {
		if err := step(); err != nil {
			return err
		}
	}
	return nil
}
