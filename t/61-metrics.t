#!/usr/bin/perl
# sbx_status (DESIGN.md section 8): Prometheus text exposition 0.0.4 checked
# by a strict parser below, JSON with ?format=json, values that match the
# traffic sent, aggregation across two workers, survival across reload.

use strict;
use warnings;

use lib 't/lib';
use JSON::PP;
use POSIX ();
use SbxMMDB;
use SbxTest;
use Test::More;
use Time::HiRes qw(sleep);

my @FAMILIES = qw(sbx_requests_total sbx_request_duration_seconds sbx_helpers
                  sbx_helper_restarts_total sbx_queue_depth
                  sbx_redis_errors_total sbx_ratelimit_fallback_total
                  sbx_dry_run_denials_total);

my %TYPE = (
    sbx_requests_total           => 'counter',
    sbx_request_duration_seconds => 'histogram',
    sbx_helpers                  => 'gauge',
    sbx_helper_restarts_total    => 'counter',
    sbx_queue_depth              => 'gauge',
    sbx_redis_errors_total       => 'counter',
    sbx_ratelimit_fallback_total => 'counter',
    sbx_dry_run_denials_total    => 'counter',
);

my @DECISIONS = qw(allowed residency_denied rate_limited retired
                   transform_error transform_timeout overloaded
                   sandbox_failure ratelimit_unavailable);

my $NAME = qr/[a-zA-Z_:][a-zA-Z0-9_:]*/;
my $LNAME = qr/[a-zA-Z_][a-zA-Z0-9_]*/;
my $FLOAT = qr/[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?|[-+]?Inf|NaN/;

# Parses text exposition 0.0.4 strictly; returns ({family => {type, help,
# samples => [[name, {labels}, value]]}}, [errors]).
sub parse_prom {
    my ($text) = @_;
    my (%fam, @err, %seen_series, $cur);
    push @err, 'does not end with a newline' unless $text =~ /\n\z/;
    my $n = 0;
    for my $line (split /\n/, $text) {
        $n++;
        if ($line =~ /^#\s*(HELP|TYPE)\s+(\S+)(?:\s(.*))?$/) {
            my ($kw, $name, $rest) = ($1, $2, $3 // '');
            push @err, "$n: bad metric name '$name'" unless $name =~ /^$NAME$/;
            my $f = $fam{$name} //= { samples => [] };
            if ($kw eq 'HELP') {
                push @err, "$n: second HELP for $name" if defined $f->{help};
                push @err, "$n: bad escape in HELP"
                    if $rest =~ /\\(?![\\n])/;
                $f->{help} = $rest;
            } else {
                push @err, "$n: second TYPE for $name" if defined $f->{type};
                push @err, "$n: TYPE after samples of $name"
                    if @{ $f->{samples} };
                push @err, "$n: bad type '$rest'" unless $rest =~
                    /^(?:counter|gauge|histogram|summary|untyped)$/;
                $f->{type} = $rest;
            }
            if (defined $cur && $cur ne $name && $fam{$cur}{done}) {
                # fine: a new family
            }
            $fam{$cur}{done} = 1 if defined $cur && $cur ne $name;
            push @err, "$n: family $name declared again after others"
                if $f->{done};
            $cur = $name;
            next;
        }
        next if $line =~ /^#/;
        push @err, "$n: empty line" if $line eq '';
        next if $line eq '';
        unless ($line =~ /^($NAME)(\{(.*)\})? ($FLOAT)(?: -?\d+)?$/) {
            push @err, "$n: not a sample: $line";
            next;
        }
        my ($name, $lbl, $value) = ($1, $3, $4);
        my %labels;
        if (defined $lbl) {
            my $s = $lbl;
            while (length $s) {
                unless ($s =~ s/^($LNAME)="((?:[^"\\\n]|\\[\\"n])*)"(,|$)//) {
                    push @err, "$n: bad label set {$lbl}";
                    last;
                }
                my ($k, $v) = ($1, $2);
                push @err, "$n: duplicate label $k" if exists $labels{$k};
                $v =~ s/\\(.)/$1 eq 'n' ? "\n" : $1/ge;
                $labels{$k} = $v;
            }
        }
        my $base = $name;
        if (defined $cur && ($TYPE{$cur} // '') eq 'histogram') {
            $base = $cur if $name =~ /^\Q$cur\E_(?:bucket|sum|count)$/;
        }
        if (!defined $cur || $base ne $cur) {
            push @err, "$n: sample $name outside its family's block";
            next;
        }
        my $key = $name . '|' . join(',', map { "$_=$labels{$_}" }
                                                sort keys %labels);
        push @err, "$n: duplicate series $key" if $seen_series{$key}++;
        push @{ $fam{$cur}{samples} }, [ $name, \%labels, $value ];
    }
    for my $name (keys %fam) {
        push @err, "$name: no TYPE" unless defined $fam{$name}{type};
        push @err, "$name: no HELP" unless defined $fam{$name}{help};
    }
    return (\%fam, \@err);
}

# histogram checks: buckets per series sorted by le, cumulative, +Inf last
# and equal to _count, _sum present
sub check_histogram {
    my ($f) = @_;
    my (%series, @err);
    for my $s (@{ $f->{samples} }) {
        my ($name, $l, $v) = @$s;
        my %rest = %$l;
        my $le = delete $rest{le};
        my $key = join(',', map { "$_=$rest{$_}" } sort keys %rest);
        if ($name =~ /_bucket$/) {
            push @err, "$key: bucket without le" unless defined $le;
            push @{ $series{$key}{buckets} }, [ $le, $v ];
        } elsif ($name =~ /_sum$/) {
            push @err, "$key: le on _sum" if defined $le;
            $series{$key}{sum} = $v;
        } elsif ($name =~ /_count$/) {
            push @err, "$key: le on _count" if defined $le;
            $series{$key}{count} = $v;
        } else {
            push @err, "$name: not a histogram sample";
        }
    }
    for my $key (sort keys %series) {
        my $s = $series{$key};
        my @b = @{ $s->{buckets} // [] };
        push @err, "$key: no buckets" unless @b;
        push @err, "$key: no _sum" unless defined $s->{sum};
        push @err, "$key: no _count" unless defined $s->{count};
        next unless @b;
        push @err, "$key: last bucket is not +Inf" unless $b[-1][0] eq '+Inf';
        for my $i (1 .. $#b) {
            my $prev = $b[$i - 1][0] eq '+Inf' ? 9**9**9 : $b[$i - 1][0];
            my $cur = $b[$i][0] eq '+Inf' ? 9**9**9 : $b[$i][0];
            push @err, "$key: le not increasing at $b[$i][0]" unless $cur > $prev;
            push @err, "$key: not cumulative at le=$b[$i][0]"
                unless $b[$i][1] >= $b[$i - 1][1];
        }
        push @err, "$key: +Inf bucket != _count"
            if defined $s->{count} && $b[-1][1] != $s->{count};
    }
    return (\%series, \@err);
}

sub status_ok {
    my ($t, $what) = @_;
    my $r = $t->get('/status');
    is($r->{status}, 200, "$what: sbx_status answers 200");
    like($r->{headers}{'content-type'} // '',
         qr{^text/plain; version=0\.0\.4\b}, "$what: content-type");
    my ($fam, $err) = parse_prom($r->{content} // '');
    is_deeply($err, [], "$what: valid text exposition") or diag($r->{content});
    is_deeply([ sort keys %$fam ], [ sort @FAMILIES ],
              "$what: every family declared, no other");
    my $types = { map { $_ => $fam->{$_}{type} } keys %$fam };
    is_deeply($types, \%TYPE, "$what: types");
    my ($hist, $herr) = check_histogram($fam->{sbx_request_duration_seconds}
                                        // { samples => [] });
    is_deeply($herr, [], "$what: histogram buckets cumulative, +Inf, "
              . '_sum and _count');
    return ($fam, $hist, $r->{content});
}

sub value {
    my ($fam, $name, %want) = @_;
    my $sum = 0;
    my $found = 0;
    for my $s (@{ $fam->{$name}{samples} // [] }) {
        next if grep { ($s->[1]{$_} // '') ne $want{$_} } keys %want;
        $sum += $s->[2];
        $found++;
    }
    return $found ? $sum : undef;
}

# --- no connector at all: every family is still declared -------------------

{
    my $t = SbxTest->new;
    $t->conf(<<'EOF');
server {
    listen 127.0.0.1:%%PORT%%;
    location = /status { sbx_status; }
}
EOF
    $t->start;
    my ($fam) = status_ok($t, 'no connectors');
    is(scalar(@{ $fam->{sbx_requests_total}{samples} }), 0,
       'no connectors: sbx_requests_total has no samples, but HELP and TYPE');
    my $r = $t->request('POST', '/status', { content => 'x' });
    is($r->{status}, 405, 'POST /status: 405');
    $t->stop;
    $t->check_error_log;
}

# --- traffic, two workers ------------------------------------------------------

my $t = SbxTest->new;
SbxMMDB::write_city($t->prefix . "/city.mmdb");
my $p = $t->prefix;

$t->write_file('ok.lua', "return function(req) return {status=200, body='ok'} end\n");
$t->write_file('err.lua', "return function(req) error('no') end\n");
$t->write_file('slow.lua', <<'EOF');
return function(req)
  local t0 = os.clock()
  while os.clock() - t0 < 0.06 do end
  return { status = 200, body = "slow" }
end
EOF
$t->write_file('backtrack.lua', <<'EOF');
return function(req)
  local s = ("a"):rep(300)
  return { status = 200, body = tostring(s:find(("a-"):rep(4) .. "b")) }
end
EOF

sub conf {
    return <<"EOF";
sbx_pool rec size=1 max_requests=2;
sbx_connector ok { script %%PREFIX%%/ok.lua; }
sbx_connector err { script %%PREFIX%%/err.lua; }
sbx_connector slow {
    script %%PREFIX%%/slow.lua;
    limits instructions=1000000000 timeout=5s;
}
sbx_connector rec { script %%PREFIX%%/ok.lua; pool rec; }
sbx_connector backtrack {
    script %%PREFIX%%/backtrack.lua;
    limits timeout=200ms;
}
sbx_connector gone { script %%PREFIX%%/ok.lua; state retired; }
sbx_connector dry { script %%PREFIX%%/ok.lua; }
sbx_geoip_db %%PREFIX%%/city.mmdb;
server {
    listen 127.0.0.1:%%PORT%%;
    add_header X-Worker \$pid always;
    location /ok        { sbx_connector ok; }
    location /err       { sbx_connector err; }
    location /slow      { sbx_connector slow; }
    location /rec       { sbx_connector rec; }
    location /backtrack { sbx_connector backtrack; }
    location /gone      { sbx_connector gone; }
    location = /status  { sbx_status; }
    location /dryres {
        sbx_residency allow DE;
        sbx_residency_dry_run on;
        sbx_connector dry;
    }
    location /dryrl {
        sbx_rate_limit key=\$remote_addr rate=1r/m burst=1 name=dry dry_run;
        sbx_connector dry;
    }
}
EOF
}

$t->conf(conf());
$t->start(workers => 2);

my ($fam) = status_ok($t, 'before traffic');
for my $c (qw(ok err slow rec backtrack gone)) {
    for my $d (@DECISIONS) {
        is(value($fam, 'sbx_requests_total', connector => $c, decision => $d),
           0, "before traffic: $c $d is 0") if $c eq 'ok' || $d eq 'allowed';
    }
}
my %labelsets = map { join(',', sort keys %{ $_->[1] }) => 1 }
                @{ $fam->{sbx_requests_total}{samples} };
is_deeply([ keys %labelsets ], [ 'connector,decision' ],
          'sbx_requests_total has exactly the labels connector and decision');
ok($t->wait_for(sub {
    my ($f) = parse_prom($t->get('/status')->{content} // '');
    (value($f, 'sbx_helpers') // 0) == 2 * 3;
}, 10), 'sbx_helpers: the helpers of both workers, every pool');

# concurrent clients so that both workers serve
my %workers;
{
    my @kids;
    for my $k (1 .. 4) {
        pipe(my $rd, my $wr) or die "pipe: $!";
        my $pid = fork // die "fork: $!";
        if ($pid == 0) {
            close $rd;
            for (1 .. 15) {
                my $r = $t->get('/ok');
                print {$wr} ($r->{status} // 0), ' ',
                            ($r->{headers}{'x-worker'} // 0), "\n";
            }
            close $wr;
            POSIX::_exit(0);
        }
        close $wr;
        push @kids, [ $pid, $rd ];
    }
    my $ok = 0;
    for my $k (@kids) {
        my $fh = $k->[1];
        while (my $l = <$fh>) {
            my ($st, $w) = split ' ', $l;
            $ok++ if $st == 200;
            $workers{$w}++;
        }
        waitpid($k->[0], 0);
    }
    is($ok, 60, '60 requests to ok answered 200');
}
$t->get('/err') for 1 .. 3;
$t->get('/gone') for 1 .. 2;
$t->get('/slow') for 1 .. 2;
my %rec_status;
$rec_status{ $t->get('/rec')->{status} }++ for 1 .. 5;
my $bt = $t->get('/backtrack');
is($bt->{status}, 504, 'backtrack: 504');
my @w = grep { $_ } keys %workers;
is(scalar @w, 2, 'both workers served requests') or diag(join ' ', %workers);

# the log phase runs after the answer: wait for the last count
ok($t->wait_for(sub {
    my ($f) = parse_prom($t->get('/status')->{content} // '');
    (value($f, 'sbx_requests_total', connector => 'backtrack') // 0) == 1;
}, 5), 'counts settle');

my ($hist, $text);
($fam, $hist, $text) = status_ok($t, 'after traffic');
is(value($fam, 'sbx_requests_total', connector => 'ok', decision => 'allowed'),
   60, 'ok allowed = 60, summed over both workers');
is(value($fam, 'sbx_requests_total', connector => 'ok'), 60,
   'ok: no other decision');
is(value($fam, 'sbx_requests_total', connector => 'err',
         decision => 'transform_error'), 3, 'err transform_error = 3');
is(value($fam, 'sbx_requests_total', connector => 'gone',
         decision => 'retired'), 2, 'gone retired = 2');
is(value($fam, 'sbx_requests_total', connector => 'backtrack',
         decision => 'transform_timeout'), 1, 'backtrack transform_timeout = 1');
is(value($fam, 'sbx_requests_total', connector => 'rec'), 5,
   'rec: 5 requests over all decisions');
is(value($fam, 'sbx_requests_total', connector => 'rec', decision => 'allowed'),
   $rec_status{200} // 0, 'rec: allowed = the answers with 200');
is(value($fam, 'sbx_requests_total', connector => 'rec',
         decision => 'sandbox_failure'), $rec_status{502} // 0,
   'rec: sandbox_failure = the answers with 502');

my $h = $hist->{'connector=slow'} // {};
is($h->{count}, 2, 'slow: _count = 2');
cmp_ok($h->{sum}, '>=', 0.12, 'slow: _sum at least 2 x 60ms');
my %b = map { $_->[0] => $_->[1] } @{ $h->{buckets} // [] };
is($b{'0.05'}, 0, 'slow: none in le=0.05 (each took 60ms or more)');
is($b{'+Inf'}, 2, 'slow: le=+Inf = 2');
is($hist->{'connector=ok'}{count}, 60, 'ok: _count = 60');
my @les = map { $_->[0] } @{ $hist->{'connector=ok'}{buckets} // [] };
is(scalar(@les), 12, 'eleven bounds and +Inf');

# counted when the killed helper is reaped, after the answer
ok($t->wait_for(sub {
    my ($f) = parse_prom($t->get('/status')->{content} // '');
    (value($f, 'sbx_helper_restarts_total', pool => 'default',
           reason => 'timeout') // 0) == 1;
}, 5), 'restarts{pool=default,reason=timeout} = 1');
ok($t->wait_for(sub {
    my ($f) = parse_prom($t->get('/status')->{content} // '');
    (value($f, 'sbx_helper_restarts_total', pool => 'rec',
           reason => 'recycle') // 0) >= 1;
}, 5), 'restarts{pool=rec,reason=recycle} counted (max_requests=2)');
my %reasons = map { $_->[1]{reason} => 1 }
              @{ $fam->{sbx_helper_restarts_total}{samples} };
is_deeply([ sort keys %reasons ],
          [ qw(exit recycle seccomp signal startup timeout) ],
          'restart reasons');
is(value($fam, 'sbx_queue_depth'), 0, 'sbx_queue_depth: nothing queued');
is(value($fam, 'sbx_redis_errors_total'), 0, 'sbx_redis_errors_total = 0');
is(value($fam, 'sbx_ratelimit_fallback_total'), 0,
   'sbx_ratelimit_fallback_total = 0');

# dry runs: decided, logged and counted, never denied
is_deeply([ sort map { $_->[1]{check} }
            @{ $fam->{sbx_dry_run_denials_total}{samples} } ],
          [ qw(ratelimit residency) ], 'dry run denials: both checks listed');
{
    my $res0 = value($fam, 'sbx_dry_run_denials_total', check => 'residency');
    my $rl0 = value($fam, 'sbx_dry_run_denials_total', check => 'ratelimit');
    # 127.0.0.1 has no country: "sbx_residency_unknown deny" would deny it
    is($t->get('/dryres')->{status}, 200, 'residency dry run: answered');
    my @st = map { $t->get('/dryrl')->{status} } 1 .. 3;
    is("@st", '200 200 200', 'rate limit dry run: never denies');
    my $f;
    ok($t->wait_for(sub {
        ($f) = parse_prom($t->get('/status')->{content} // '');
        (value($f, 'sbx_dry_run_denials_total', check => 'ratelimit') // 0)
            - ($rl0 // 0) == 2;
    }, 5), 'sbx_dry_run_denials_total{check="ratelimit"}: the 2 requests '
           . 'over the limit');
    is((value($f, 'sbx_dry_run_denials_total', check => 'residency') // 0)
       - ($res0 // 0), 1,
       'sbx_dry_run_denials_total{check="residency"}: the one request');
}

# --- JSON ------------------------------------------------------------------

my $r = $t->get('/status?format=json');
like($r->{headers}{'content-type'} // '', qr{^application/json}, 'JSON: type');
my $j = eval { decode_json($r->{content}) };
ok(ref $j eq 'HASH', 'JSON: parses') or diag($@ . ($r->{content} // ''));
$j //= {};
is_deeply([ sort keys %$j ], [ sort @FAMILIES ], 'JSON: every family');
is($j->{sbx_requests_total}{type}, 'counter', 'JSON: type');
like($j->{sbx_requests_total}{help} // '', qr/\S/, 'JSON: help');
my ($js) = grep { $_->{labels}{connector} eq 'ok'
                  && $_->{labels}{decision} eq 'allowed' }
           @{ $j->{sbx_requests_total}{samples} // [] };
is($js->{value}, 60, 'JSON: the same value as the text');
my ($jsum) = grep { $_->{name} eq 'sbx_request_duration_seconds_sum'
                    && $_->{labels}{connector} eq 'slow' }
             @{ $j->{sbx_request_duration_seconds}{samples} // [] };
cmp_ok($jsum->{value} // 0, '>=', 0.12, 'JSON: _sum is a number');

# --- reload: counters survive ----------------------------------------------------

$t->reload;
($fam) = status_ok($t, 'after reload');
is(value($fam, 'sbx_requests_total', connector => 'ok', decision => 'allowed'),
   60, 'reload: counters kept');
$t->get('/ok');
ok($t->wait_for(sub {
    my ($f) = parse_prom($t->get('/status')->{content} // '');
    (value($f, 'sbx_requests_total', connector => 'ok',
           decision => 'allowed') // 0) == 61;
}, 5), 'reload: and they go on counting');
ok($t->wait_for(sub {
    my ($f) = parse_prom($t->get('/status')->{content} // '');
    (value($f, 'sbx_helpers') // 0) == 2 * 3;
}, 10), 'reload: sbx_helpers counts the new workers only');

$t->stop;
$t->check_error_log;

done_testing;
