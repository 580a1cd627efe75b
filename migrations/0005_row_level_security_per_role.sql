-- walcast.rls_check, same arguments and answers as in 0003, with the claims sets of one role
-- checked by one statement instead of one statement each.
--
-- Per claims set, 0003 paid for a subtransaction, four separate set_config statements and a
-- dynamic EXECUTE (parsed and planned every time) before the policy query ran: about 50 µs,
-- which for 100 distinct subjects was most of every check. Here one planned statement of the
-- generated check function sets each claims set's settings and evaluates the policies under
-- them, claims set after claims set (a few µs each); the role is set once per run of equal
-- roles. One subtransaction covers the run: when a policy raises for one claims set, the run
-- is checked again one claims set at a time, each in a subtransaction of its own, so the
-- error denies that claims set only (as in 0003).
--
-- The check function of a table, its columns and the policy set is created in the session's
-- temporary schema under a name derived from their text:
--   pg_temp.walcast_rls2_<md5>(rows <table>[], claims jsonb[], wanted text[], lo int, hi int)
--     RETURNS TABLE (walcast_k int, walcast_visible int[])
-- one result row per claims set lo..hi: the wanted positions (all when wanted[k] is NULL) whose
-- row version the current role may see with claims[k] set. Positions come back unordered.

CREATE OR REPLACE FUNCTION walcast.rls_check(
    rel regclass, roles text[], claims jsonb[], wanted text[], rows jsonb, template anyarray
)
    RETURNS TABLE (k int, access text, hidden text[], visible int[], error text)
    LANGUAGE plpgsql
    SET search_path = ''
    AS $fn$
DECLARE
    typed template%TYPE;
    alias text;
    columns text;
    casts text;
    n int := coalesce(pg_catalog.array_length(roles, 1), 0);
    lo int := 1;
    hi int;
    role_name text;
    role_access text;
    role_hidden text[];
    role_error text;
    query text;
    checker text;
    caller_role text := pg_catalog.current_setting('role');
BEGIN
    SELECT pg_catalog.quote_ident(c.relname) INTO alias FROM pg_catalog.pg_class c WHERE c.oid = rel;
    SELECT pg_catalog.string_agg(pg_catalog.quote_ident(a.attname), ', ' ORDER BY a.attnum),
           pg_catalog.string_agg(pg_catalog.format('(r.j ->> %L)::%s', a.attname,
                                 pg_catalog.format_type(a.atttypid, a.atttypmod)), ', ' ORDER BY a.attnum)
      INTO columns, casts
      FROM pg_catalog.pg_attribute a
     WHERE a.attrelid = rel AND a.attnum > 0 AND NOT a.attisdropped;
    WHILE lo <= n LOOP
        role_name := roles[lo];
        hi := lo;
        WHILE hi < n AND roles[hi + 1] IS NOT DISTINCT FROM role_name LOOP
            hi := hi + 1;
        END LOOP;
        -- What the role may read of the table, and its check function.
        role_error := NULL;
        checker := NULL;
        BEGIN
            PERFORM pg_catalog.set_config('role', role_name, true);
            IF NOT pg_catalog.has_any_column_privilege(rel, 'SELECT') THEN
                role_access := 'none';
                role_hidden := NULL;
            ELSE
                SELECT pg_catalog.array_agg(a.attname::text ORDER BY a.attnum)
                  INTO role_hidden
                  FROM pg_catalog.pg_attribute a
                 WHERE a.attrelid = rel AND a.attnum > 0 AND NOT a.attisdropped
                   AND NOT pg_catalog.has_column_privilege(rel, a.attnum, 'SELECT');
                role_access := CASE WHEN pg_catalog.row_security_active(rel) THEN 'rls' ELSE 'open' END;
            END IF;
            IF role_access = 'rls' THEN
                -- The policies that apply to the role, as one condition on a row of the table.
                SELECT '(' || pg_catalog.string_agg('(' || pg_catalog.pg_get_expr(p.polqual, p.polrelid) || ')', ' OR ')
                                  FILTER (WHERE p.polpermissive) || ')'
                       || coalesce(' AND ' || pg_catalog.string_agg('(' || pg_catalog.pg_get_expr(p.polqual, p.polrelid) || ')', ' AND ')
                                  FILTER (WHERE NOT p.polpermissive), '')
                  INTO query
                  FROM pg_catalog.pg_policy p
                 WHERE p.polrelid = rel AND p.polcmd IN ('r', '*') AND p.polqual IS NOT NULL
                   AND EXISTS (SELECT FROM pg_catalog.unnest(p.polroles) AS pr(id)
                                WHERE pr.id = 0 OR pg_catalog.pg_has_role(role_name, pr.id, 'USAGE'))
                HAVING pg_catalog.bool_or(p.polpermissive);
                IF query IS NOT NULL THEN
                    checker := 'walcast_rls2_' || pg_catalog.md5(query || columns || rel::text);
                    IF NOT EXISTS (SELECT FROM pg_catalog.pg_proc f
                                    WHERE f.proname = checker AND f.pronamespace = pg_catalog.pg_my_temp_schema()) THEN
                        PERFORM pg_catalog.set_config('role', caller_role, true);
                        -- One statement for every claims set lo..hi: for each, the claims are
                        -- set (walcast_g, a lateral subquery that is evaluated once per claims
                        -- set: it calls volatile functions, so it is never merged into the
                        -- query), then the policies are evaluated on the rows (walcast_v, which
                        -- depends on walcast_g, so it runs after it, once per claims set).
                        -- Wanted positions are matched by hashing: a batch may hold thousands
                        -- of rows. PL/pgSQL keeps the plan for the session.
                        EXECUTE pg_catalog.format(
                            'CREATE FUNCTION pg_temp.%I(%s[], jsonb[], text[], int, int) '
                            'RETURNS TABLE (walcast_k int, walcast_visible int[]) LANGUAGE plpgsql AS '
                            '$walcast_check$ #variable_conflict use_column
'
                            'BEGIN RETURN QUERY '
                            'SELECT (walcast_s.walcast_at + $4 - 1)::int, walcast_v.walcast_rows '
                            'FROM ROWS FROM (pg_catalog.unnest($2[$4:$5]), pg_catalog.unnest($3[$4:$5])) '
                            'WITH ORDINALITY AS walcast_s(walcast_claims, walcast_wanted, walcast_at) '
                            'CROSS JOIN LATERAL (SELECT '
                            'pg_catalog.set_config(''request.jwt.claims'', walcast_s.walcast_claims::text, true) AS walcast_c, '
                            'pg_catalog.set_config(''request.jwt.claim.sub'', coalesce(walcast_s.walcast_claims ->> ''sub'', ''''), true) AS walcast_cs, '
                            'pg_catalog.set_config(''request.jwt.claim.role'', coalesce(walcast_s.walcast_claims ->> ''role'', ''''), true) AS walcast_cr'
                            ') AS walcast_g '
                            'CROSS JOIN LATERAL (SELECT coalesce(pg_catalog.array_agg(walcast_n::int), ''{}'') AS walcast_rows '
                            'FROM pg_catalog.unnest($1) WITH ORDINALITY AS %s(%s, walcast_n) '
                            'WHERE walcast_g.walcast_c IS NOT NULL AND walcast_g.walcast_cs IS NOT NULL '
                            'AND walcast_g.walcast_cr IS NOT NULL '
                            'AND (walcast_s.walcast_wanted IS NULL '
                            'OR walcast_n IN (SELECT pg_catalog.unnest(walcast_s.walcast_wanted::int[]))) '
                            'AND %s) AS walcast_v; '
                            'END $walcast_check$',
                            checker, rel, alias, columns, query);
                        PERFORM pg_catalog.set_config('role', role_name, true);
                    END IF;
                    IF typed IS NULL THEN
                        -- The rows, typed once for every role.
                        EXECUTE pg_catalog.format(
                            'SELECT pg_catalog.array_agg(ROW(%s)::%s ORDER BY r.n) '
                            'FROM pg_catalog.jsonb_array_elements($1) WITH ORDINALITY AS r(j, n)',
                            casts, rel)
                          INTO typed USING rows;
                    END IF;
                END IF;
            END IF;
        EXCEPTION WHEN OTHERS THEN
            role_error := SQLERRM;
        END;
        IF role_error IS NOT NULL THEN
            FOR i IN lo .. hi LOOP
                k := i; access := 'error'; hidden := NULL; visible := NULL; error := role_error;
                RETURN NEXT;
            END LOOP;
        ELSIF checker IS NULL THEN
            -- No row to check: every claims set of the role gets the role's answer.
            FOR i IN lo .. hi LOOP
                k := i; access := role_access; hidden := role_hidden; error := NULL;
                visible := CASE WHEN role_access = 'rls' THEN '{}'::int[] END;
                RETURN NEXT;
            END LOOP;
        ELSE
            BEGIN
                PERFORM pg_catalog.set_config('role', role_name, true);
                -- The check function returns its whole result before the first row is read, so
                -- no row of a run that fails reaches the result.
                RETURN QUERY EXECUTE pg_catalog.format(
                    'SELECT c.walcast_k, $6, $7, c.walcast_visible, NULL::text FROM pg_temp.%I($1, $2, $3, $4, $5) c',
                    checker) USING typed, claims, wanted, lo, hi, role_access, role_hidden;
            EXCEPTION WHEN OTHERS THEN
                -- One claims set at a time: an error denies only the one it comes from.
                FOR i IN lo .. hi LOOP
                    k := i;
                    BEGIN
                        PERFORM pg_catalog.set_config('role', role_name, true);
                        EXECUTE pg_catalog.format('SELECT c.walcast_visible FROM pg_temp.%I($1, $2, $3, $4, $4) c', checker)
                          INTO visible USING typed, claims, wanted, i;
                        access := role_access;
                        hidden := role_hidden;
                        error := NULL;
                    EXCEPTION WHEN OTHERS THEN
                        access := 'error';
                        hidden := NULL;
                        visible := NULL;
                        error := SQLERRM;
                    END;
                    RETURN NEXT;
                END LOOP;
            END;
        END IF;
        lo := hi + 1;
    END LOOP;
    PERFORM pg_catalog.set_config('role', caller_role, true);
    PERFORM pg_catalog.set_config('request.jwt.claims', '', true);
    PERFORM pg_catalog.set_config('request.jwt.claim.sub', '', true);
    PERFORM pg_catalog.set_config('request.jwt.claim.role', '', true);
END
$fn$;
